// Counter-based Gaussian noise, the same numbers as Triton's tl.randn(key, offset).
//
// Noise of element v for counter `step` under a 64-bit key:
//   (r0, r1, r2, r3) = Philox4x32-10(key = (key lo, key hi), counter = (v, step, 0, 0))
// which is Triton's randint4x(seed = key, offset = v + (step << 32)). Then Triton's
// uint -> uniform conversion and Box-Muller on (r0, r1), keeping the cosine branch.
//
// To be bit-identical with Triton's GPU code the device path mirrors what Triton emits
// for tl.randn on NVIDIA: cvt.rn + mul.rn (no FMA contraction) for the uniforms,
// libdevice logf / cosf, and sqrt.approx.ftz.f32 for its "fast" tl.sqrt. The inputs of
// logf (>= 1e-7) and cosf (quantized multiples of 2 pi 2^-31) never reach denormals, so
// the ftz and non-ftz libdevice variants agree on them.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define PRDIT_HD __host__ __device__ __forceinline__
#else
#define PRDIT_HD inline
#endif

namespace prdit {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
// Largest scale with INT32_MAX * scale < 1 in fp32 (Triton's uint_to_uniform_float).
constexpr float kUniformScale = 4.6566127342e-10f;
constexpr float kUniformFloor = 1.0e-7f;
constexpr float kTwoPi = 6.283185307179586f;

PRDIT_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 in place on the counter c, with Triton's round structure.
PRDIT_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t c0 = c[0], c2 = c[2];
    c[0] = mulhi32(kPhiloxRoundB, c2) ^ c[1] ^ k0;
    c[2] = mulhi32(kPhiloxRoundA, c0) ^ c[3] ^ k1;
    c[1] = kPhiloxRoundB * c2;
    c[3] = kPhiloxRoundA * c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// The four words of Triton's randint4x(key, offset) for a 64-bit offset.
PRDIT_HD void philox_words(uint64_t key, uint64_t offset, uint32_t words[4]) {
  words[0] = static_cast<uint32_t>(offset);
  words[1] = static_cast<uint32_t>(offset >> 32);
  words[2] = 0;
  words[3] = 0;
  philox4x32_10(words, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
}

PRDIT_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// Uniform in [0, 1): the word as int32, negatives folded as -x - 1, times the scale.
PRDIT_HD float word_to_uniform(uint32_t word) {
  int32_t i = static_cast<int32_t>(word);
  i = i < 0 ? ~i : i;
  return mul_rn(static_cast<float>(i), kUniformScale);
}

PRDIT_HD float fast_sqrt(float x) {
#ifdef __CUDA_ARCH__
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return std::sqrt(x);
#endif
}

// Box-Muller (cosine branch) of the first two words, as tl.randn.
PRDIT_HD float words_to_normal(uint32_t w0, uint32_t w1) {
  const float u1 = fmaxf(kUniformFloor, word_to_uniform(w0));
  const float theta = mul_rn(kTwoPi, word_to_uniform(w1));
  const float radius = fast_sqrt(mul_rn(-2.0f, logf(u1)));
  return mul_rn(radius, cosf(theta));
}

PRDIT_HD float philox_normal(uint64_t key, uint64_t offset) {
  uint32_t words[4];
  philox_words(key, offset, words);
  return words_to_normal(words[0], words[1]);
}

// Offset of element v at counter `step`, as the Triton kernels form it.
PRDIT_HD uint64_t noise_offset(uint64_t element, uint32_t step) {
  return element + (static_cast<uint64_t>(step) << 32);
}

}  // namespace prdit
