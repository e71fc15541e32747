// Throughput of the vector instructions the 8-bit step is made of, on this CPU: nanoseconds per
// instruction, 12 independent ones per loop iteration, and that in cycles at the clock measured by a
// chain of dependent integer adds (1 cycle latency). The AVX2 table runs on every x86-64 CPU with
// AVX2, the AVX-512 one where the CPU has AVX512-BW and VBMI. Which instructions are cheap differs
// between CPUs: on Intel cores (Ice Lake and later) two-register word and byte permutes, vpmovwb and
// compares into mask registers take port 5 for 2, 2 and 1 cycles, and the divider is slow (vdivps,
// vsqrtps); on AMD Zen 4 word permutes were cheap; on AMD Zen 3 (AVX2 only) a gather of 8 lanes
// takes about 9 cycles, the loads it replaces far less (docs/performance.md).
//
//   g++ -O2 tools/instruction_cost.cpp -o /tmp/instruction_cost && /tmp/instruction_cost
//
// No -m flags: the instructions are in asm statements, and the compiled C++ around them must run on
// a CPU without AVX-512.
#include <chrono>
#include <cstdio>

#define STR(x) #x
#define REP12(op) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11) op(12) op(13) op(14) op(15)
#define CLOBBERS "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

// AVX2: ymm1 and ymm2 are fixed inputs (ymm1 indices 0 for the gathers), ymm3 a gather's mask
// (consumed by each gather: reset from ymm2, all ones, first), ymm4..ymm15 the independent chains;
// %0 points at a table.
#define VPADDD(r) "vpaddd %%ymm1, %%ymm" STR(r) ", %%ymm" STR(r) "\n"
#define VPADDD_CHAIN(r) "vpaddd %%ymm1, %%ymm4, %%ymm4\n"
#define VPGATHERDD(r) "vmovdqa %%ymm2, %%ymm3\n vpgatherdd %%ymm3, (%0,%%ymm1,4), %%ymm" STR(r) "\n"
#define VGATHERDPS(r) "vmovdqa %%ymm2, %%ymm3\n vgatherdps %%ymm3, (%0,%%ymm1,4), %%ymm" STR(r) "\n"
#define VINSERTPS(r) "vinsertps $0x10, 4(%0), %%xmm" STR(r) ", %%xmm" STR(r) "\n"  // a load into a lane
#define VPERMPS(r) "vpermps %%ymm" STR(r) ", %%ymm1, %%ymm" STR(r) "\n"
#define VPSHUFB(r) "vpshufb %%ymm1, %%ymm" STR(r) ", %%ymm" STR(r) "\n"
#define VPMULLD(r) "vpmulld %%ymm1, %%ymm" STR(r) ", %%ymm" STR(r) "\n"
#define VFMADD(r) "vfmadd231ps %%ymm1, %%ymm2, %%ymm" STR(r) "\n"
#define VDIVPS_Y(r) "vdivps %%ymm2, %%ymm" STR(r) ", %%ymm" STR(r) "\n"
#define VSQRTPS_Y(r) "vsqrtps %%ymm" STR(r) ", %%ymm" STR(r) "\n"

// AVX-512: zmm1, zmm2 and k1 are fixed inputs, zmm4..zmm15 the independent chains.
#define VPADDW(r) "vpaddw %%zmm1, %%zmm" STR(r) ", %%zmm" STR(r) "\n"
#define VPADDW_CHAIN(r) "vpaddw %%zmm1, %%zmm4, %%zmm4\n"
#define VPERMT2W(r) "vpermt2w %%zmm1, %%zmm2, %%zmm" STR(r) "\n"
#define VPERMT2B(r) "vpermt2b %%zmm1, %%zmm2, %%zmm" STR(r) "\n"
#define VPERMT2D(r) "vpermt2d %%zmm1, %%zmm2, %%zmm" STR(r) "\n"
#define VPERMW(r) "vpermw %%zmm" STR(r) ", %%zmm2, %%zmm" STR(r) "\n"
#define VPERMB(r) "vpermb %%zmm" STR(r) ", %%zmm2, %%zmm" STR(r) "\n"
#define VPMOVWB(r) "vpmovwb %%zmm" STR(r) ", %%ymm" STR(r) "\n"
#define VPMULHUW(r) "vpmulhuw %%zmm1, %%zmm" STR(r) ", %%zmm" STR(r) "\n"
#define VPBLENDMW(r) "vpblendmw %%zmm1, %%zmm" STR(r) ", %%zmm" STR(r) "%{%%k1%}\n"
#define VPCMPUW(r) "vpcmpuw $1, %%zmm1, %%zmm" STR(r) ", %%k2\n"
#define VCVTPS2PD(r) "vcvtps2pd %%ymm" STR(r) ", %%zmm" STR(r) "\n"
#define VDIVPS(r) "vdivps %%zmm1, %%zmm" STR(r) ", %%zmm" STR(r) "\n"
#define VSQRTPS(r) "vsqrtps %%zmm" STR(r) ", %%zmm" STR(r) "\n"

namespace {

constexpr long kIterations = 20000000;
alignas(64) float table[64];

template <typename Body>
double ns_per_instruction(Body body) {
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < kIterations; ++i) body();
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / (kIterations * 12.0);
}

struct Row {
  const char* name;
  double ns;
};

template <int N>
void print(const char* title, const char* clock_by, double ns_per_cycle, const Row (&rows)[N]) {
  std::printf("%s; clock %.2f GHz (%s)\n", title, 1.0 / ns_per_cycle, clock_by);
  std::printf("%-14s %8s %8s\n", "instruction", "ns", "cycles");
  for (const Row& r : rows) std::printf("%-14s %8.3f %8.2f\n", r.name, r.ns, r.ns / ns_per_cycle);
}

// (No mask registers in the clobbers: built without AVX-512 flags, the compiler uses none of them.)
#define MEASURE(name, op) {name, ns_per_instruction([] { asm volatile(REP12(op) ::"r"(table) : CLOBBERS); })}

void avx2() {
  asm volatile("vpxor %%xmm1, %%xmm1, %%xmm1\n vpcmpeqd %%ymm2, %%ymm2, %%ymm2" ::: "xmm1", "xmm2");
  const double ns_per_cycle = ns_per_instruction([] {  // 12 dependent vpaddd on one register
    asm volatile(REP12(VPADDD_CHAIN) ::: "xmm4");
  });
  const Row gathers[] = {MEASURE("vpgatherdd", VPGATHERDD), MEASURE("vgatherdps", VGATHERDPS),
                         MEASURE("vinsertps m32", VINSERTPS)};
  asm volatile("vbroadcastss %0, %%ymm1\n vbroadcastss %0, %%ymm2" ::"m"(table[3]) : "xmm1", "xmm2");
  const Row arithmetic[] = {MEASURE("vdivps", VDIVPS_Y), MEASURE("vsqrtps", VSQRTPS_Y),
                            MEASURE("vfmadd231ps", VFMADD)};
  asm volatile("vpxor %%xmm1, %%xmm1, %%xmm1" ::: "xmm1");
  const Row permutes[] = {MEASURE("vpaddd", VPADDD), MEASURE("vpermps", VPERMPS),
                          MEASURE("vpshufb", VPSHUFB), MEASURE("vpmulld", VPMULLD)};
  const Row rows[] = {gathers[0], gathers[1], gathers[2], arithmetic[0], arithmetic[1], arithmetic[2],
                      permutes[0], permutes[1], permutes[2], permutes[3]};
  print("one core, AVX2 (256-bit registers; the gathers with their mask's reset, 8 lanes each)", "dependent vpaddd",
        ns_per_cycle, rows);
}

void avx512() {
  asm volatile("vpxord %%zmm1, %%zmm1, %%zmm1\n vpxord %%zmm2, %%zmm2, %%zmm2\n kxnorq %%k1, %%k1, %%k1" ::: "xmm1",
               "xmm2");
  const double ns_per_cycle = ns_per_instruction([] {  // 12 dependent vpaddw on one register
    asm volatile(REP12(VPADDW_CHAIN) ::: "xmm4");
  });
  const Row rows[] = {
      MEASURE("vpaddw", VPADDW),       MEASURE("vpblendmw", VPBLENDMW), MEASURE("vpmulhuw", VPMULHUW),
      MEASURE("vpermw", VPERMW),       MEASURE("vpermb", VPERMB),       MEASURE("vpermt2d", VPERMT2D),
      MEASURE("vpermt2w", VPERMT2W),   MEASURE("vpermt2b", VPERMT2B),   MEASURE("vpmovwb", VPMOVWB),
      MEASURE("vpcmpuw -> k", VPCMPUW), MEASURE("vcvtps2pd", VCVTPS2PD), MEASURE("vdivps", VDIVPS),
      MEASURE("vsqrtps", VSQRTPS),
  };
  print("one core, AVX-512 (512-bit registers)", "dependent vpaddw", ns_per_cycle, rows);
}

}  // namespace

int main() {
  for (int i = 0; i < 64; ++i) table[i] = 1.0f + i;
  if (!__builtin_cpu_supports("avx2")) {
    std::printf("this CPU has no AVX2\n");
    return 1;
  }
  avx2();
  if (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi")) {
    std::printf("\n");
    avx512();
  } else {
    std::printf("\n(no AVX512-BW and VBMI here: no AVX-512 table)\n");
  }
}
