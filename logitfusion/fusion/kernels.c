/* The CPU kernels of the DLF fast path (docs/algorithms.md §3 "Binned line curves", §4 "Dense rows").

   Built on first use by logitfusion/fusion/native.py with the machine's C compiler and loaded with ctypes; no
   Python or torch headers. Every function reads finite fp32 logits (the caller's guard has checked them) and
   writes float64 results. Two passes per row replace the ~30 tensor passes of the same arithmetic in torch, and
   the bin scatter (index_add_ in torch, 1.2 ns per element and moment) becomes a loop into an L1-resident table.

   Layout: a row is V contiguous floats; expert logits come as T separate [R, V] matrices (one pointer each).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LF_MOMENTS 9 /* power sums S_0 .. S_8 per bin: dlf._BIN_MOMENTS (checked by native.py) */
#define LF_BLOCK 1024 /* elements per inner block: every block buffer stays in L1 */
#define LF_COPIES 4   /* interleaved bin tables: consecutive tokens in one bin do not wait on each other's store */

int lf_abi_version(void) { return 9; }
int lf_moments(void) { return LF_MOMENTS; }

/* exp(x) in float64 for |x| <= 700, relative error below 1e-15, written so that the compiler vectorises it (glibc's
   vector exp costs about 1.3 ns a value on this machine; this about a quarter of that): x = k ln 2 + f with
   |f| <= ln 2 / 2, exp(f) by its Taylor polynomial of degree 12 (remainder (ln 2 / 2)^13 / 13! < 2e-16), and 2^k
   written into the exponent bits. Arguments outside [-700, 700] are clamped (the callers keep them inside). */
static inline double lf_exp(double x) {
  x = x < -700.0 ? -700.0 : (x > 700.0 ? 700.0 : x);
  const double k = __builtin_rint(x * 1.4426950408889634);
  const double f = (x - k * 0.6931471803691238) - k * 1.9082149292705877e-10;
  double p = 1.0 / 479001600.0;
  p = p * f + 1.0 / 39916800.0;
  p = p * f + 1.0 / 3628800.0;
  p = p * f + 1.0 / 362880.0;
  p = p * f + 1.0 / 40320.0;
  p = p * f + 1.0 / 5040.0;
  p = p * f + 1.0 / 720.0;
  p = p * f + 1.0 / 120.0;
  p = p * f + 1.0 / 24.0;
  p = p * f + 1.0 / 6.0;
  p = p * f + 0.5;
  p = p * f + 1.0;
  p = p * f + 1.0;
  const int64_t bits = ((int64_t)k + 1023) << 52;
  double two_k;
  memcpy(&two_k, &bits, sizeof two_k);
  return p * two_k;
}

int lf_exp_check(int64_t n, const double* x, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = lf_exp(x[i]);
  return 0;
}

static float row_max(const float* x, int64_t n) {
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

static int64_t non_finite(const float* x, int64_t n) {
  const uint32_t* b = (const uint32_t*)x;
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += (b[i] & 0x7f800000u) == 0x7f800000u;
  return c;
}

/* Pass 1, per row r of R: with d_t = z_E,t - z_S (raw logits, so Delta_t = d_t + k_t for a per-row constant k_t),
   writes
     w[r, v]          = exp(z_L - max z_L)                 (unnormalised P; the row sum is out[r, T, 0])
     out[r, t, 0..4]  = KL(Q_t || Q), KL(Q || Q_t), E_P[d_t], min_v d_t, max_v d_t
     out[r, T, 0]     = sum_v w[r, v]
   and, in the same pass, the certified candidate support of docs/algorithms.md §4 (candidates._bound's arithmetic,
   in float; c_t = max z_E,t - max z_S):
     U_v = z_L,v + A sum_t max(d_t,v - c_t, 0),   L = max_v [z_L,v + A sum_t min(d_t,v - c_t, 0)],
     counts[r] = #{v : U_v >= L - slack},  idx[r, :counts[r]] = those v in order when counts[r] <= limit.
   The count only sends a row to the candidate solve or to the dense one (either is exact for any row), so its
   rounding may differ from torch's by an ulp. out is [R, T + 1, 5] float64; idx is [R, limit] int32 (may be NULL).
   The exps are float (vectorised), every product and sum float64. Returns the number of non-finite logits read
   (NaN or +-inf: every exponent bit set, an integer test that -ffast-math leaves alone); when it is not 0 nothing
   written means anything, and the rows after the first bad one are not read. */
int64_t lf_dlf_pass1(int64_t R, int64_t T, int64_t V, const float* zl, const float* zs, const float* const* ze,
                     float* w, double* out, double max_alpha, double slack, int64_t limit, int64_t* counts,
                     int32_t* idx) {
  float* es = (float*)malloc(sizeof(float) * LF_BLOCK);
  float* ee = (float*)malloc(sizeof(float) * LF_BLOCK);
  float* pos = (float*)malloc(sizeof(float) * LF_BLOCK);
  float* neg = (float*)malloc(sizeof(float) * LF_BLOCK);
  float* up = (float*)malloc(sizeof(float) * (size_t)V);
  double* acc = (double*)malloc(sizeof(double) * (size_t)(4 * T + 2));
  float* lo = (float*)malloc(sizeof(float) * (size_t)T);
  float* hi = (float*)malloc(sizeof(float) * (size_t)T);
  float* me = (float*)malloc(sizeof(float) * (size_t)T);
  const float A = (float)max_alpha;
  int64_t bad = 0;
  for (int64_t r = 0; r < R && !bad; ++r) {
    const float* l = zl + r * V;
    const float* s = zs + r * V;
    float* wr = w + r * V;
    bad += non_finite(l, V) + non_finite(s, V);
    for (int64_t t = 0; t < T; ++t) bad += non_finite(ze[t] + r * V, V);
    if (bad) break;
    const float ml = row_max(l, V), ms = row_max(s, V);
    for (int64_t t = 0; t < T; ++t) {
      me[t] = row_max(ze[t] + r * V, V);
      lo[t] = hi[t] = ze[t][r * V] - s[0]; /* not +-INFINITY: built with -ffast-math, which assumes no inf */
    }
    memset(acc, 0, sizeof(double) * (size_t)(4 * T + 2));
    double* n_e = acc;          /* [T] sum exp(z_E - max) */
    double* s_ed = acc + T;     /* [T] sum exp(z_E - max) d */
    double* s_sd = acc + 2 * T; /* [T] sum exp(z_S - max) d */
    double* s_ld = acc + 3 * T; /* [T] sum exp(z_L - max) d */
    double n_s = 0.0, n_l = 0.0;
    float best = l[0] - 3.0e38f;
    for (int64_t i0 = 0; i0 < V; i0 += LF_BLOCK) {
      const int64_t n = V - i0 < LF_BLOCK ? V - i0 : LF_BLOCK;
      double bs = 0.0, bl = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const float x = expf(s[i0 + i] - ms), y = expf(l[i0 + i] - ml);
        es[i] = x;
        wr[i0 + i] = y;
        bs += x;
        bl += y;
        pos[i] = neg[i] = 0.f;
      }
      n_s += bs;
      n_l += bl;
      for (int64_t t = 0; t < T; ++t) {
        const float* e = ze[t] + r * V + i0;
        const float m = me[t], c = me[t] - ms;
        double be = 0.0, bed = 0.0, bsd = 0.0, bld = 0.0;
        float blo = lo[t], bhi = hi[t];
        for (int64_t i = 0; i < n; ++i) ee[i] = expf(e[i] - m);
        for (int64_t i = 0; i < n; ++i) {
          const double d = (double)e[i] - (double)s[i0 + i];
          const float df = e[i] - s[i0 + i];
          const float db = df - c;
          be += ee[i];
          bed += ee[i] * d;
          bsd += es[i] * d;
          bld += wr[i0 + i] * d;
          blo = df < blo ? df : blo;
          bhi = df > bhi ? df : bhi;
          pos[i] += db > 0.f ? db : 0.f;
          neg[i] += db < 0.f ? db : 0.f;
        }
        n_e[t] += be;
        s_ed[t] += bed;
        s_sd[t] += bsd;
        s_ld[t] += bld;
        lo[t] = blo;
        hi[t] = bhi;
      }
      for (int64_t i = 0; i < n; ++i) {
        const float lower = l[i0 + i] + A * neg[i];
        best = lower > best ? lower : best;
        up[i0 + i] = l[i0 + i] + A * pos[i];
      }
    }
    double* o = out + r * (T + 1) * 5;
    for (int64_t t = 0; t < T; ++t) {
      /* Delta_t = d_t + k_t with k_t = -(max z_E - max z_S) - (log n_E - log n_S) */
      const double k = -((double)me[t] - (double)ms) - (log(n_e[t]) - log(n_s));
      const double a = s_ed[t] / n_e[t] + k, b = -(s_sd[t] / n_s + k);
      o[t * 5 + 0] = a > 0.0 ? a : 0.0;
      o[t * 5 + 1] = b > 0.0 ? b : 0.0;
      o[t * 5 + 2] = s_ld[t] / n_l;
      /* the float extremes, widened by their rounding, bound the float64 d used by the bins */
      o[t * 5 + 3] = (double)lo[t] - 1e-6 * (1.0 + fabs((double)lo[t]));
      o[t * 5 + 4] = (double)hi[t] + 1e-6 * (1.0 + fabs((double)hi[t]));
    }
    o[T * 5 + 0] = n_l;
    const float threshold = (float)((double)best - slack);
    int64_t count = 0;
    for (int64_t i = 0; i < V; ++i) count += up[i] >= threshold;
    counts[r] = count;
    if (idx != NULL && count <= limit) {
      int32_t* ir = idx + r * limit;
      int64_t k = 0;
      for (int64_t i = 0; i < V; ++i)
        if (up[i] >= threshold) ir[k++] = (int32_t)i;
    }
  }
  free(es);
  free(ee);
  free(pos);
  free(neg);
  free(up);
  free(acc);
  free(lo);
  free(hi);
  free(me);
  return bad;
}

/* Pass 2, per expert t and row r: tokens binned by d_t = z_E,t - z_S (float64) into bins of `width` from lo[t, r],
   with u = d_t - (lo + (k + 1/2) width) the offset from the bin centre:
     out[t, r, k, j] = sum_{v in bin k} w[r, v] u_v^j,   j < LF_MOMENTS
   out is [T, R, bins, LF_MOMENTS] float64 and is overwritten. */
void lf_bin_moments(int64_t R, int64_t T, int64_t V, int64_t bins, double width, const float* zs,
                    const float* const* ze, const float* w, const double* lo, double* out) {
  const size_t table = (size_t)bins * LF_MOMENTS;
  double* h = (double*)malloc(sizeof(double) * table * LF_COPIES);
  int32_t* kk = (int32_t*)malloc(sizeof(int32_t) * LF_BLOCK);
  double* uu = (double*)malloc(sizeof(double) * LF_BLOCK);
  const double inv = 1.0 / width, top = (double)(bins - 1);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t r = 0; r < R; ++r) {
      const float* e = ze[t] + r * V;
      const float* s = zs + r * V;
      const float* wr = w + r * V;
      const double base = lo[t * R + r];
      memset(h, 0, sizeof(double) * table * LF_COPIES);
      for (int64_t i0 = 0; i0 < V; i0 += LF_BLOCK) {
        const int64_t n = V - i0 < LF_BLOCK ? V - i0 : LF_BLOCK;
        for (int64_t i = 0; i < n; ++i) {
          const double d = (double)e[i0 + i] - (double)s[i0 + i];
          double f = floor((d - base) * inv);
          f = f < 0.0 ? 0.0 : (f > top ? top : f);
          uu[i] = d - (base + (f + 0.5) * width);
          kk[i] = (int32_t)f * LF_MOMENTS;
        }
        for (int64_t i = 0; i < n; ++i) {
          double p = wr[i0 + i];
          const double u = uu[i];
          double* q = h + (size_t)(i & (LF_COPIES - 1)) * table + kk[i];
          q[0] += p; p *= u; q[1] += p; p *= u; q[2] += p; p *= u; q[3] += p; p *= u; q[4] += p;
          p *= u; q[5] += p; p *= u; q[6] += p; p *= u; q[7] += p; p *= u; q[8] += p;
        }
      }
      double* o = out + ((size_t)t * R + r) * table;
      for (size_t k = 0; k < table; ++k) {
        double x = 0.0;
        for (int c = 0; c < LF_COPIES; ++c) x += h[c * table + k];
        o[k] = x;
      }
    }
  }
  free(h);
  free(kk);
  free(uu);
}

/* Joint DLF at alphas[r, :] (every expert active), per row r: with Delta_t = d_t - mean[r, t] (d_t = z_E,t - z_S in
   float64, mean = E_P[d_t], so E_P[Delta_t] = 0), s = sum_t alpha_t Delta_t and e = w exp(s):
     out[r, 0]                 = sum e
     out[r, 1 + t]             = sum e Delta_t
     out[r, 1 + T + t T + q]   = sum e Delta_t Delta_q          (q >= t; the rest is left 0)
     out[r, 1 + T + T^2 + ...] = sum e s Delta_t Delta_q        (q >= t)
   With derivs = 0 only out[r, 0..T] are written (the loss needs sum e and sum e s = sum_t alpha_t out[r, 1 + t]).
   out is [R, 1 + T + 2 T^2] float64, overwritten. The caller keeps max_alpha * sum_t max|Delta_t| below ~600
   (no overflow of exp in float64). */
void lf_joint_moments(int64_t R, int64_t T, int64_t V, const float* zs, const float* const* ze, const float* w,
                      const double* mean, const double* alphas, int derivs, double* out) {
  const int64_t width = 1 + T + 2 * T * T;
  double* delta = (double*)malloc(sizeof(double) * (size_t)(T * LF_BLOCK));
  double* q = (double*)malloc(sizeof(double) * (size_t)(T * LF_BLOCK));
  double* e = (double*)malloc(sizeof(double) * LF_BLOCK);
  double* sv = (double*)malloc(sizeof(double) * LF_BLOCK);
  for (int64_t r = 0; r < R; ++r) {
    double* o = out + r * width;
    memset(o, 0, sizeof(double) * (size_t)width);
    const double* a = alphas + r * T;
    const double* m = mean + r * T;
    const float* s = zs + r * V;
    const float* wr = w + r * V;
    for (int64_t i0 = 0; i0 < V; i0 += LF_BLOCK) {
      const int64_t n = V - i0 < LF_BLOCK ? V - i0 : LF_BLOCK;
      for (int64_t i = 0; i < n; ++i) sv[i] = 0.0;
      for (int64_t t = 0; t < T; ++t) {
        const float* x = ze[t] + r * V + i0;
        double* dt = delta + t * LF_BLOCK;
        const double mt = m[t], at = a[t];
        for (int64_t i = 0; i < n; ++i) {
          dt[i] = ((double)x[i] - (double)s[i0 + i]) - mt;
          sv[i] += at * dt[i];
        }
      }
      for (int64_t i = 0; i < n; ++i) e[i] = (double)wr[i0 + i] * lf_exp(sv[i]);
      double z = 0.0;
      for (int64_t i = 0; i < n; ++i) z += e[i];
      o[0] += z;
      for (int64_t t = 0; t < T; ++t) {
        const double* dt = delta + t * LF_BLOCK;
        double* qt = q + t * LF_BLOCK;
        double acc = 0.0;
        for (int64_t i = 0; i < n; ++i) {
          qt[i] = e[i] * dt[i];
          acc += qt[i];
        }
        o[1 + t] += acc;
      }
      if (!derivs) continue;
      for (int64_t t = 0; t < T; ++t) {
        const double* qt = q + t * LF_BLOCK;
        for (int64_t u = t; u < T; ++u) {
          const double* du = delta + u * LF_BLOCK;
          double m2 = 0.0, m3 = 0.0;
          for (int64_t i = 0; i < n; ++i) {
            const double y = qt[i] * du[i];
            m2 += y;
            m3 += y * sv[i];
          }
          o[1 + T + t * T + u] += m2;
          o[1 + T + T * T + t * T + u] += m3;
        }
      }
    }
  }
  free(delta);
  free(q);
  free(e);
  free(sv);
}

/* The grid's one-expert curves, exactly: for expert t, row r and the uniform grid alpha_g = g h (g < G), with
   Delta = d_t - mean[r, t] and e = w exp(alpha_g Delta):
     out[t, r, g, 0] = sum e,   out[t, r, g, 1] = sum e Delta
   exp(alpha_g Delta) is exp(h Delta)^g, one multiplication per grid point, so the whole grid costs about one exp
   and three vector operations per point and token (no bins, no scatter). out is [T, R, G, 2] float64, overwritten.
   The caller keeps (G - 1) h max |Delta| below ~600 (no overflow in float64). */
typedef double lf_v8 __attribute__((vector_size(64)));
#if defined(__AVX512F__)
#define LF_GROUP 7 /* grid points per sweep: 2 accumulators each + 4 operands within 32 vector registers */
#else
#define LF_GROUP 3 /* 16 registers of half the width: each lf_v8 takes two */
#endif

void lf_grid_curves(int64_t R, int64_t T, int64_t V, int64_t G, double h, const float* zs, const float* const* ze,
                    const float* w, const double* mean, double* out) {
  double* delta = (double*)aligned_alloc(64, sizeof(double) * LF_BLOCK);
  double* pw = (double*)aligned_alloc(64, sizeof(double) * LF_BLOCK);
  double* pd = (double*)aligned_alloc(64, sizeof(double) * LF_BLOCK);
  double* ratio = (double*)aligned_alloc(64, sizeof(double) * LF_BLOCK);
  double* e = (double*)aligned_alloc(64, sizeof(double) * LF_BLOCK);
  lf_v8* acc = (lf_v8*)aligned_alloc(64, sizeof(lf_v8) * (size_t)(2 * G));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t r = 0; r < R; ++r) {
      const float* x = ze[t] + r * V;
      const float* s = zs + r * V;
      const float* wr = w + r * V;
      const double m = mean[r * T + t];
      memset(acc, 0, sizeof(lf_v8) * (size_t)(2 * G));
      for (int64_t i0 = 0; i0 < V; i0 += LF_BLOCK) {
        int64_t n = V - i0 < LF_BLOCK ? V - i0 : LF_BLOCK;
        for (int64_t i = 0; i < n; ++i) {
          delta[i] = ((double)x[i0 + i] - (double)s[i0 + i]) - m;
          pw[i] = (double)wr[i0 + i];
        }
        for (int64_t i = 0; i < n; ++i) {
          pd[i] = pw[i] * delta[i];
          ratio[i] = lf_exp(h * delta[i]);
          e[i] = 1.0;
        }
        const int64_t n8 = (n + 7) & ~(int64_t)7;
        for (int64_t i = n; i < n8; ++i) pw[i] = pd[i] = 0.0, ratio[i] = e[i] = 1.0; /* padding adds nothing */
        for (int64_t g0 = 0; g0 < G; g0 += LF_GROUP) {
          const int64_t ng = G - g0 < LF_GROUP ? G - g0 : LF_GROUP;
          lf_v8 a0[LF_GROUP], a1[LF_GROUP];
          for (int k = 0; k < LF_GROUP; ++k) a0[k] = a1[k] = (lf_v8){0, 0, 0, 0, 0, 0, 0, 0};
          for (int64_t i = 0; i < n8; i += 8) {
            lf_v8 ev, rv, wv, dv;
            memcpy(&ev, e + i, sizeof ev);
            memcpy(&rv, ratio + i, sizeof rv);
            memcpy(&wv, pw + i, sizeof wv);
            memcpy(&dv, pd + i, sizeof dv);
#pragma GCC unroll 8
            for (int k = 0; k < LF_GROUP; ++k) {
              a0[k] += wv * ev;
              a1[k] += dv * ev;
              ev *= rv;
            }
            memcpy(e + i, &ev, sizeof ev);
          }
          for (int64_t k = 0; k < ng; ++k) {
            acc[2 * (g0 + k)] += a0[k];
            acc[2 * (g0 + k) + 1] += a1[k];
          }
          if (ng < LF_GROUP) break;
        }
      }
      double* o = out + ((size_t)t * R + r) * (size_t)(2 * G);
      for (int64_t k = 0; k < 2 * G; ++k) {
        double x8 = 0.0;
        for (int l = 0; l < 8; ++l) x8 += acc[k][l];
        o[k] = x8;
      }
    }
  }
  free(delta);
  free(pw);
  free(pd);
  free(ratio);
  free(e);
  free(acc);
}

/* A static recipe in one read of each model (docs/algorithms.md §2, "How a static step is computed"): per row,
     out = log_softmax(sum_m weights[r * row_stride + m] (z_m - max z_m))
   in float, as candidates.static_log_probs computes it (a weight of exactly 0 adds nothing; every model is still
   guarded). row_stride 0: one weight per model for every row (static recipes); M: per-row weights (a DLF step's
   fused scores: 1 on the large base, -sum_t alpha_t on the small one, alpha_t on expert t). out is [R, V] float32.
   Returns the number of non-finite logits read (then out means nothing). */
int64_t lf_static_fuse(int64_t R, int64_t M, int64_t V, const float* const* z, const double* weights,
                       int64_t row_stride, float* out) {
  int64_t bad = 0;
  float* top = (float*)malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
  for (int64_t r = 0; r < R && !bad; ++r) {
    for (int64_t m = 0; m < M; ++m) {
      bad += non_finite(z[m] + r * V, V);
      top[m] = row_max(z[m] + r * V, V);
    }
    if (bad) break;
    float* o = out + r * V;
    for (int64_t i = 0; i < V; ++i) o[i] = 0.f;
    for (int64_t m = 0; m < M; ++m) {
      const float wm = (float)weights[r * row_stride + m], c = top[m];
      if (wm == 0.f) continue;
      const float* x = z[m] + r * V;
      for (int64_t i = 0; i < V; ++i) o[i] += wm * (x[i] - c);
    }
    const float mx = row_max(o, V);
    double sum = 0.0;
    for (int64_t i0 = 0; i0 < V; i0 += LF_BLOCK) {
      const int64_t n = V - i0 < LF_BLOCK ? V - i0 : LF_BLOCK;
      float block = 0.f;
      for (int64_t i = 0; i < n; ++i) block += expf(o[i0 + i] - mx);
      sum += block;
    }
    const float shift = mx + (float)log(sum);
    for (int64_t i = 0; i < V; ++i) o[i] -= shift;
  }
  free(top);
  return bad;
}
