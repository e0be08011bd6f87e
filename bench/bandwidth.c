/* This machine's read bandwidth, as the engine's kernels read weights: 1 GiB read with the widest vector
 * loads the CPU has (AVX-512, else AVX2) on 2 threads (OpenMP), best of 10. The figure the weights' read
 * rate at concurrency 1 is held against (docs/performance.md):
 *
 *     gcc -O3 -march=native -fopenmp bench/bandwidth.c -o /tmp/bandwidth && /tmp/bandwidth
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
typedef __m512i vec;
#define WIDTH "AVX-512"
#define ZERO() _mm512_setzero_si512()
#define LOAD(p) _mm512_load_si512(p)
#define XOR(a, b) _mm512_xor_si512(a, b)
#define SINK(v) _mm512_reduce_add_epi32(v)
#else
typedef __m256i vec;
#define WIDTH "AVX2"
#define ZERO() _mm256_setzero_si256()
#define LOAD(p) _mm256_load_si256((const __m256i *)(p))
#define XOR(a, b) _mm256_xor_si256(a, b)
#define SINK(v) _mm256_movemask_epi8(v)
#endif

int main(void) {
  size_t n = (size_t)1 << 30, step = 4 * sizeof(vec);
  char *a = aligned_alloc(64, n);
  memset(a, 1, n);
  double best = 0;
  for (int r = 0; r < 10; r++) {
    double start = omp_get_wtime();
    vec all = ZERO();
#pragma omp parallel num_threads(2)
    {
      vec acc = ZERO();
#pragma omp for schedule(static)
      for (size_t i = 0; i < n; i += step) {
        acc = XOR(acc, LOAD(a + i));
        acc = XOR(acc, LOAD(a + i + sizeof(vec)));
        acc = XOR(acc, LOAD(a + i + 2 * sizeof(vec)));
        acc = XOR(acc, LOAD(a + i + 3 * sizeof(vec)));
      }
#pragma omp critical
      all = XOR(all, acc);
    }
    double seconds = omp_get_wtime() - start;
    volatile int sink = SINK(all);  /* depends on every lane: keeps the loads */
    (void)sink;
    if (n / seconds / 1e9 > best) best = n / seconds / 1e9;
  }
  printf("read bandwidth: %.1f GB/s (1 GiB, 2 threads, %s loads, best of 10)\n", best, WIDTH);
  free(a);
  return 0;
}
