// The exponential of the soft mask, in a translation unit of its own: CMake compiles this
// file with -ffast-math (GCC/Clang) so that the loop calls glibc's vector exp (libmvec).
// The argument is clamped so that exp never overflows (-ffinite-math-only assumes no inf);
// the clamp changes 1 / (1 + exp(z)) by less than exp(-80) ~ 2e-35.
#include <cmath>
#include <cstdint>

namespace whymatch {

void sigmoid_keep(const float* u, float alpha, float beta, float* keep, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float z = alpha * (u[i] - beta);
    z = z < -80.f ? -80.f : (z > 80.f ? 80.f : z);
    keep[i] = 1.f / (1.f + std::exp(z));
  }
}

void sigmoid_keep(const double* u, double alpha, double beta, double* keep, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    double z = alpha * (u[i] - beta);
    z = z < -700.0 ? -700.0 : (z > 700.0 ? 700.0 : z);
    keep[i] = 1.0 / (1.0 + std::exp(z));
  }
}

}  // namespace whymatch
