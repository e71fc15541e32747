// Throughput of the AVX-512 instructions the 8-bit step is made of, on this CPU: nanoseconds per
// instruction, 12 independent ones per loop iteration, and that in cycles at the clock measured by a
// chain of dependent vpaddw (1 cycle latency). Which instructions are cheap differs between CPUs:
// on Intel cores (Ice Lake and later) two-register word and byte permutes, vpmovwb and compares
// into mask registers take port 5 for 2, 2 and 1 cycles, and the divider is slow (vdivps, vsqrtps);
// on AMD Zen 4 word permutes were cheap (docs/performance.md).
//
//   g++ -O2 -mavx512f -mavx512bw -mavx512vbmi tools/instruction_cost.cpp -o /tmp/instruction_cost
//   /tmp/instruction_cost
#include <chrono>
#include <cstdio>

#define STR(x) #x
#define REP12(op) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11) op(12) op(13) op(14) op(15)
// One instruction each; zmm1, zmm2 and k1 are fixed inputs, zmm4..zmm15 the independent chains.
#define VPERMT2W(r) "vpermt2w %%zmm1, %%zmm2, %%zmm" STR(r) "\n"
#define VPERMT2B(r) "vpermt2b %%zmm1, %%zmm2, %%zmm" STR(r) "\n"
#define VPERMT2D(r) "vpermt2d %%zmm1, %%zmm2, %%zmm" STR(r) "\n"
#define VPERMW(r) "vpermw %%zmm" STR(r) ", %%zmm2, %%zmm" STR(r) "\n"
#define VPERMB(r) "vpermb %%zmm" STR(r) ", %%zmm2, %%zmm" STR(r) "\n"
#define VPMOVWB(r) "vpmovwb %%zmm" STR(r) ", %%ymm" STR(r) "\n"
#define VPMULHUW(r) "vpmulhuw %%zmm1, %%zmm" STR(r) ", %%zmm" STR(r) "\n"
#define VPADDW(r) "vpaddw %%zmm1, %%zmm" STR(r) ", %%zmm" STR(r) "\n"
#define VPBLENDMW(r) "vpblendmw %%zmm1, %%zmm" STR(r) ", %%zmm" STR(r) "%{%%k1%}\n"
#define VPCMPUW(r) "vpcmpuw $1, %%zmm1, %%zmm" STR(r) ", %%k2\n"
#define VCVTPS2PD(r) "vcvtps2pd %%ymm" STR(r) ", %%zmm" STR(r) "\n"
#define VDIVPS(r) "vdivps %%zmm1, %%zmm" STR(r) ", %%zmm" STR(r) "\n"
#define VSQRTPS(r) "vsqrtps %%zmm" STR(r) ", %%zmm" STR(r) "\n"
#define CLOBBERS "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "k2"

namespace {

constexpr long kIterations = 20000000;

template <typename Body>
double ns_per_instruction(Body body) {
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < kIterations; ++i) body();
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / (kIterations * 12.0);
}

}  // namespace

#define MEASURE(name, op) {name, ns_per_instruction([] { asm volatile(REP12(op) ::: CLOBBERS); })}

int main() {
  asm volatile("vpxord %%zmm1, %%zmm1, %%zmm1\n vpxord %%zmm2, %%zmm2, %%zmm2\n kxnorq %%k1, %%k1, %%k1" ::: "xmm1", "xmm2", "k1");
  // The clock: 12 dependent vpaddw per iteration on one register (1 cycle each).
  const double ns_per_cycle = ns_per_instruction([] {
    asm volatile(
        "vpaddw %%zmm1, %%zmm4, %%zmm4\n vpaddw %%zmm1, %%zmm4, %%zmm4\n vpaddw %%zmm1, %%zmm4, %%zmm4\n"
        "vpaddw %%zmm1, %%zmm4, %%zmm4\n vpaddw %%zmm1, %%zmm4, %%zmm4\n vpaddw %%zmm1, %%zmm4, %%zmm4\n"
        "vpaddw %%zmm1, %%zmm4, %%zmm4\n vpaddw %%zmm1, %%zmm4, %%zmm4\n vpaddw %%zmm1, %%zmm4, %%zmm4\n"
        "vpaddw %%zmm1, %%zmm4, %%zmm4\n vpaddw %%zmm1, %%zmm4, %%zmm4\n vpaddw %%zmm1, %%zmm4, %%zmm4\n" ::: "xmm4");
  });
  const struct {
    const char* name;
    double ns;
  } rows[] = {
      MEASURE("vpaddw", VPADDW),       MEASURE("vpblendmw", VPBLENDMW), MEASURE("vpmulhuw", VPMULHUW),
      MEASURE("vpermw", VPERMW),       MEASURE("vpermb", VPERMB),       MEASURE("vpermt2d", VPERMT2D),
      MEASURE("vpermt2w", VPERMT2W),   MEASURE("vpermt2b", VPERMT2B),   MEASURE("vpmovwb", VPMOVWB),
      MEASURE("vpcmpuw -> k", VPCMPUW), MEASURE("vcvtps2pd", VCVTPS2PD), MEASURE("vdivps", VDIVPS),
      MEASURE("vsqrtps", VSQRTPS),
  };
  std::printf("one core, 512-bit registers; clock %.2f GHz (dependent vpaddw)\n", 1.0 / ns_per_cycle);
  std::printf("%-14s %8s %8s\n", "instruction", "ns", "cycles");
  for (const auto& r : rows) std::printf("%-14s %8.3f %8.2f\n", r.name, r.ns, r.ns / ns_per_cycle);
}
