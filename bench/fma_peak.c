/* This machine's float32 FMA peak, as the engine's AVX2 kernels multiply: 12 independent chains of 8-lane
 * FMAs a thread (more than the FMA units' latency times their number), on every OpenMP thread, best of 5.
 * The figure a compute-bound matmul (a prompt's prefill, a large batch's decode) is held against
 * (docs/performance.md). On AVX-512 CPUs it gives AVX2's half of their width.
 *
 *     gcc -O2 -march=native -fopenmp bench/fma_peak.c -o /tmp/fma_peak && OMP_NUM_THREADS=2 /tmp/fma_peak
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#define CHAINS 12
#define STEPS 20000000L

int main(void) {
  double best = 0;
  float sink = 0;
  for (int run = 0; run < 5; run++) {
    const double start = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
    {
      __m256 acc[CHAINS];
      const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
      for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_set1_ps((float)c);
      for (long i = 0; i < STEPS; i++)
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm256_fmadd_ps(acc[c], x, y);
      __m256 total = acc[0];
      for (int c = 1; c < CHAINS; c++) total = _mm256_add_ps(total, acc[c]);
      float lanes[8];
      _mm256_storeu_ps(lanes, total);
      sink += lanes[0];  // (keeps the chains)
    }
    const double flops = 2.0 * 8 * CHAINS * STEPS * omp_get_max_threads() / (omp_get_wtime() - start);
    if (flops > best) best = flops;
  }
  printf("%d threads: %.1f GFLOP/s float32 FMA peak (AVX2, best of 5; sink %g)\n", omp_get_max_threads(), best / 1e9,
         sink);
  return 0;
}
