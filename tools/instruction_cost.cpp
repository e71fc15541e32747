// Throughput of the vector instructions the 8-bit step is made of, on this CPU: nanoseconds per
// instruction, 12 independent ones per loop iteration, and that in cycles at the clock measured by a
// chain of dependent integer adds (1 cycle latency). The AVX2 table runs on every x86-64 CPU with
// AVX2, the AVX-512 one where the CPU has AVX512-BW and VBMI. Which instructions are cheap differs
// between CPUs: on Intel cores (Ice Lake and later) two-register word and byte permutes, vpmovwb and
// compares into mask registers take port 5 for 2, 2 and 1 cycles, and the divider is slow (vdivps,
// vsqrtps); on AMD Zen 4 word permutes were cheap; on AMD Zen 3 (AVX2 only) a gather of 8 lanes
// takes 9-12 cycles, the loads it replaces far less (docs/performance.md).
//
//   g++ -O2 tools/instruction_cost.cpp -o /tmp/instruction_cost && /tmp/instruction_cost
//
// No -m flags: the instructions are in asm statements, and the compiled C++ around them must run on
// a CPU without AVX-512.
#include <chrono>
#include <cstdio>

#define STR(x) #x
#define REP12(op) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11) op(12) op(13) op(14) op(15)

// Each row is one asm statement: it sets its fixed inputs, then runs kIterations times 12 of the
// instruction on the independent registers 4..15, so nothing the compiler does can change its inputs.
// %0 points at `table` (1.0, 2.0, ...), %1 at `lanes` (gather indices), %2 is the loop count.
#define LOOP(setup, op)                                                                              \
  asm volatile(setup "mov %2, %%rcx\n 1:\n" REP12(op) "dec %%rcx\n jnz 1b\n" ::"r"(table), "r"(lanes), \
               "r"(kIterations)                                                                      \
               : "rcx", "cc", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",  \
                 "xmm11", "xmm12", "xmm13", "xmm14", "xmm15")

// AVX2 inputs: ymm1 and ymm2.
#define ZERO_ONES "vpxor %%xmm1, %%xmm1, %%xmm1\n vpcmpeqd %%ymm2, %%ymm2, %%ymm2\n"  // 0; all ones
#define ONE_ONE "vbroadcastss (%0), %%ymm1\n vbroadcastss (%0), %%ymm2\n"            // 1.0; 1.0
#define LANES_ONES "vmovdqu (%1), %%ymm1\n vpcmpeqd %%ymm2, %%ymm2, %%ymm2\n"        // indices; all ones
#define VPADDD(r) "vpaddd %%ymm1, %%ymm" STR(r) ", %%ymm" STR(r) "\n"
#define VPADDD_CHAIN(r) "vpaddd %%ymm1, %%ymm4, %%ymm4\n"
// a gather consumes its mask (ymm3): reset from ymm2 first
#define VPGATHERDD(r) "vmovdqa %%ymm2, %%ymm3\n vpgatherdd %%ymm3, (%0,%%ymm1,4), %%ymm" STR(r) "\n"
#define VGATHERDPS(r) "vmovdqa %%ymm2, %%ymm3\n vgatherdps %%ymm3, (%0,%%ymm1,4), %%ymm" STR(r) "\n"
#define VINSERTPS(r) "vinsertps $0x10, 4(%0), %%xmm" STR(r) ", %%xmm" STR(r) "\n"  // a load into a lane
#define VPERMPS(r) "vpermps %%ymm" STR(r) ", %%ymm1, %%ymm" STR(r) "\n"
#define VPSHUFB(r) "vpshufb %%ymm1, %%ymm" STR(r) ", %%ymm" STR(r) "\n"
#define VPMULLD(r) "vpmulld %%ymm1, %%ymm" STR(r) ", %%ymm" STR(r) "\n"
#define VFMADD(r) "vfmadd231ps %%ymm1, %%ymm2, %%ymm" STR(r) "\n"
#define VDIVPS_Y(r) "vdivps %%ymm2, %%ymm1, %%ymm" STR(r) "\n"  // 1 / 1: normal operands only
#define VSQRTPS_Y(r) "vsqrtps %%ymm1, %%ymm" STR(r) "\n"

// AVX-512 inputs: zmm1, zmm2 and k1 (all ones). No mask register is declared clobbered: built
// without AVX-512 flags, the compiler uses none of them.
#define ZEROS_K1 "vpxord %%zmm1, %%zmm1, %%zmm1\n vpxord %%zmm2, %%zmm2, %%zmm2\n kxnorq %%k1, %%k1, %%k1\n"
#define ONE_ONE_Z "vbroadcastss (%0), %%zmm1\n vbroadcastss (%0), %%zmm2\n"
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
#define VDIVPS(r) "vdivps %%zmm2, %%zmm1, %%zmm" STR(r) "\n"  // 1 / 1
#define VSQRTPS(r) "vsqrtps %%zmm1, %%zmm" STR(r) "\n"

namespace {

constexpr long kIterations = 20000000;
alignas(64) float table[64];
alignas(64) int lanes[8] = {0, 9, 18, 27, 36, 45, 54, 63};  // 8 lanes, on 4 cache lines of the table

template <typename Body>
double ns_per_instruction(Body body) {
  const auto t0 = std::chrono::steady_clock::now();
  body();
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

#define MEASURE(name, setup, op) {name, ns_per_instruction([] { LOOP(setup, op); })}

void avx2() {
  const double ns_per_cycle = ns_per_instruction([] { LOOP(ZERO_ONES, VPADDD_CHAIN); });  // 1 cycle each
  const Row rows[] = {
      MEASURE("vpgatherdd", LANES_ONES, VPGATHERDD), MEASURE("vgatherdps", LANES_ONES, VGATHERDPS),
      MEASURE("vinsertps m32", ZERO_ONES, VINSERTPS), MEASURE("vdivps", ONE_ONE, VDIVPS_Y),
      MEASURE("vsqrtps", ONE_ONE, VSQRTPS_Y),         MEASURE("vfmadd231ps", ONE_ONE, VFMADD),
      MEASURE("vpaddd", ZERO_ONES, VPADDD),           MEASURE("vpermps", ZERO_ONES, VPERMPS),
      MEASURE("vpshufb", ZERO_ONES, VPSHUFB),         MEASURE("vpmulld", ZERO_ONES, VPMULLD),
  };
  print("one core, AVX2 (256-bit registers; the gathers with their mask's reset, 8 lanes each)", "dependent vpaddd",
        ns_per_cycle, rows);
}

void avx512() {
  const double ns_per_cycle = ns_per_instruction([] { LOOP(ZEROS_K1, VPADDW_CHAIN); });  // 1 cycle each
  const Row rows[] = {
      MEASURE("vpaddw", ZEROS_K1, VPADDW),         MEASURE("vpblendmw", ZEROS_K1, VPBLENDMW),
      MEASURE("vpmulhuw", ZEROS_K1, VPMULHUW),     MEASURE("vpermw", ZEROS_K1, VPERMW),
      MEASURE("vpermb", ZEROS_K1, VPERMB),         MEASURE("vpermt2d", ZEROS_K1, VPERMT2D),
      MEASURE("vpermt2w", ZEROS_K1, VPERMT2W),     MEASURE("vpermt2b", ZEROS_K1, VPERMT2B),
      MEASURE("vpmovwb", ZEROS_K1, VPMOVWB),       MEASURE("vpcmpuw -> k", ZEROS_K1, VPCMPUW),
      MEASURE("vcvtps2pd", ZEROS_K1, VCVTPS2PD),   MEASURE("vdivps", ONE_ONE_Z, VDIVPS),
      MEASURE("vsqrtps", ONE_ONE_Z, VSQRTPS),
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
