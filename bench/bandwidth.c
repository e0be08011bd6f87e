/* This machine's read bandwidth, as the engine's kernels read weights: 1 GiB read with AVX-512 loads on
 * 2 threads (OpenMP), best of 10. The figure the weights' read rate at concurrency 1 is held against
 * (docs/performance.md):
 *
 *     gcc -O3 -march=native -fopenmp bench/bandwidth.c -o /tmp/bandwidth && /tmp/bandwidth
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
  size_t n = (size_t)1 << 30;
  char *a = aligned_alloc(64, n);
  memset(a, 1, n);
  double best = 0;
  for (int r = 0; r < 10; r++) {
    double start = omp_get_wtime();
    __m512i all = _mm512_setzero_si512();
#pragma omp parallel num_threads(2)
    {
      __m512i acc = _mm512_setzero_si512();
#pragma omp for schedule(static)
      for (size_t i = 0; i < n; i += 256) {
        acc = _mm512_xor_si512(acc, _mm512_load_si512(a + i));
        acc = _mm512_xor_si512(acc, _mm512_load_si512(a + i + 64));
        acc = _mm512_xor_si512(acc, _mm512_load_si512(a + i + 128));
        acc = _mm512_xor_si512(acc, _mm512_load_si512(a + i + 192));
      }
#pragma omp critical
      all = _mm512_xor_si512(all, acc);
    }
    double seconds = omp_get_wtime() - start;
    volatile int sink = _mm512_reduce_add_epi32(all);  /* keeps the loads */
    (void)sink;
    if (n / seconds / 1e9 > best) best = n / seconds / 1e9;
  }
  printf("read bandwidth: %.1f GB/s (1 GiB, 2 threads, AVX-512 loads, best of 10)\n", best);
  free(a);
  return 0;
}
