#pragma once
// The activations the ops compute after the normalization (SPEC section 3), one scalar function each
// for the CPU and CUDA kernels. The codes are cmbn_ext/activations.py's (part of the ops' schema);
// the formulas and the side taken at a kink are torch's own forward and backward.
// The activation is a run-time argument (a uniform branch per value), never a template parameter.
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define CMBN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CMBN_HOST_DEVICE inline
#endif

namespace cmbn {

enum Activation : int64_t {
  kIdentity = 0,
  kRelu = 1,
  kLeakyRelu = 2,  // param: negative slope
  kElu = 3,        // param: alpha
  kSilu = 4,
  kMish = 5,
  kHardswish = 6,
};
constexpr int64_t kActivationCount = 7;

// The activation's run-time description, passed by value to the kernels.
struct ActivationArgs {
  int64_t code;
  double param;
};

// Whether the output determines the pre-activation value (memory="lean").
CMBN_HOST_DEVICE bool activation_invertible(int64_t code, double param) {
  return code == kIdentity || ((code == kLeakyRelu || code == kElu) && param > 0);
}

// memory="lean" divides by the weight: smaller magnitudes are taken as this one, with their sign
// (zero as positive); cmbn_ext/reference.py's LEAN_MIN_WEIGHT.
constexpr double kLeanMinWeight = 1e-3;

template <typename T>
CMBN_HOST_DEVICE T lean_weight(T w) {
  const T magnitude = w < T(0) ? -w : w;
  const T kept = magnitude < T(kLeanMinWeight) ? T(kLeanMinWeight) : magnitude;
  return w < T(0) ? -kept : kept;
}

template <typename T>
CMBN_HOST_DEVICE T sigmoid_of(T z) {
  return T(1) / (T(1) + exp(-z));
}

// torch's softplus (beta 1, threshold 20), as F.mish computes it.
template <typename T>
CMBN_HOST_DEVICE T softplus_of(T z) {
  return z > T(20) ? z : log1p(exp(z));
}

// act(z).
template <typename T>
CMBN_HOST_DEVICE T activate(T z, int64_t code, T param) {
  switch (code) {
    case kRelu:
      return z > T(0) ? z : T(0);
    case kLeakyRelu:
      return z > T(0) ? z : z * param;
    case kElu:
      return z > T(0) ? z : param * (exp(z) - T(1));
    case kSilu:
      return z * sigmoid_of(z);
    case kMish:
      return z * tanh(softplus_of(z));
    case kHardswish:
      return z <= T(-3) ? T(0) : (z >= T(3) ? z : z * (z + T(3)) / T(6));
    default:
      return z;
  }
}

// act'(z), as torch's backward of each activation takes it.
template <typename T>
CMBN_HOST_DEVICE T activation_derivative(T z, int64_t code, T param) {
  switch (code) {
    case kRelu:
      return z > T(0) ? T(1) : T(0);
    case kLeakyRelu:
      return z > T(0) ? T(1) : param;
    case kElu:
      return z > T(0) ? T(1) : param * exp(z);
    case kSilu: {
      const T s = sigmoid_of(z);
      return s * (T(1) + z * (T(1) - s));
    }
    case kMish: {
      const T t = tanh(softplus_of(z));
      return t + z * sigmoid_of(z) * (T(1) - t * t);
    }
    case kHardswish:
      return z < T(-3) ? T(0) : (z <= T(3) ? z / T(3) + T(0.5) : T(1));
    default:
      return T(1);
  }
}

// z from act(z), for the invertible activations.
template <typename T>
CMBN_HOST_DEVICE T invert_activation(T out, int64_t code, T param) {
  switch (code) {
    case kLeakyRelu:
      return out > T(0) ? out : out / param;
    case kElu:
      return out > T(0) ? out : log1p(out / param);
    default:
      return out;
  }
}

// act'(z) from act(z), for the invertible activations (z > 0 exactly where act(z) > 0).
template <typename T>
CMBN_HOST_DEVICE T activation_derivative_from_output(T out, int64_t code, T param) {
  switch (code) {
    case kLeakyRelu:
      return out > T(0) ? T(1) : param;
    case kElu:
      return out > T(0) ? T(1) : out + param;
    default:
      return T(1);
  }
}

}  // namespace cmbn
