#pragma once
// cmbn_update_state's arguments as both kernel families (cpu/, cuda/) take them: the layer's mode and
// the checks of the layer's buffers and the micro-batch's statistics, run before any buffer is written.
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "op_checks.h"

namespace cmbn {

inline constexpr char kUpdateStateOp[] = "cmbn_update_state";

enum class StateMode : int { kCumulative, kSliding, kEma, kDeferred };

inline StateMode parse_mode(std::string_view mode) {
  if (mode == "cumulative") return StateMode::kCumulative;
  if (mode == "sliding") return StateMode::kSliding;
  if (mode == "ema") return StateMode::kEma;
  if (mode == "deferred") return StateMode::kDeferred;
  TORCH_CHECK(false, kUpdateStateOp,
              ": layer_mode must be 'cumulative', 'sliding', 'ema' or 'deferred', got '",
              std::string(mode), "'");
  return StateMode::kCumulative;
}

// The count m of cmbn_update_state's schema: a 0-dim int64 tensor (each family checks where it lies).
inline void check_count_tensor(const at::Tensor& m) {
  TORCH_CHECK(m.scalar_type() == at::kLong, kUpdateStateOp, ": m must be int64, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 0, kUpdateStateOp, ": m must be a 0-dim tensor, got shape ", m.sizes());
}

// m known on the host (read from that tensor, or cmbn_train_forward's, from x's shape).
inline void check_host_count(int64_t m) {
  TORCH_CHECK(m >= 0, kUpdateStateOp, ": m must be >= 0, got ", m);
}

// What the checks found: the mode, the window's shape (S, C), and whether the running statistics are
// tracked.
struct StateArguments {
  StateMode mode;
  int64_t slots;
  int64_t channels;
  bool tracking;
};

inline StateArguments check_state_arguments(
    const at::Tensor& window_count, const at::Tensor& window_mean, const at::Tensor& window_var,
    const at::Tensor& window_step, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& batch_mean, const at::Tensor& batch_var,
    std::string_view layer_mode, c10::DeviceType device) {
  const char* op = kUpdateStateOp;
  const StateMode mode = parse_mode(layer_mode);
  TORCH_CHECK(window_count.device().type() == device, op, ": window_count must be a ",
              c10::DeviceTypeName(device), " tensor, got one on ", window_count.device());
  TORCH_CHECK(window_count.scalar_type() == at::kLong, op, ": window_count must be int64, got ",
              window_count.scalar_type());
  TORCH_CHECK(window_count.dim() == 2, op, ": window_count must have shape (S, C), got ",
              window_count.sizes());
  const int64_t slots = window_count.size(0);
  const int64_t channels = window_count.size(1);
  TORCH_CHECK(mode == StateMode::kSliding || slots >= 1, op, ": mode '", std::string(layer_mode),
              "' keeps its window in slot 0, but window_count has no slot");

  const auto check_on_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == window_count.device(), op, ": ", name, " is on ", t.device(),
                " but window_count is on ", window_count.device());
  };
  const auto check_float = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    check_on_device(t, name);
    TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, " must be a float tensor, got ",
                t.scalar_type());
    TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  };
  const auto check_scalar_count = [&](const at::Tensor& t, const char* name) {
    check_on_device(t, name);
    TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
    TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold one value, got shape ", t.sizes());
  };
  const auto check_same_dtype = [&](const at::Tensor& a, const at::Tensor& b, const char* names) {
    TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", names, " must have one dtype, got ",
                a.scalar_type(), " and ", b.scalar_type());
  };

  check_float(window_mean, "window_mean", window_count.sizes());
  check_float(window_var, "window_var", window_count.sizes());
  check_same_dtype(window_mean, window_var, "window_mean and window_var");
  check_scalar_count(window_step, "window_step");

  const bool has_running_mean = running_mean.has_value() && running_mean->defined();
  const bool has_running_var = running_var.has_value() && running_var->defined();
  const bool has_tracked = num_batches_tracked.has_value() && num_batches_tracked->defined();
  TORCH_CHECK(has_running_mean == has_running_var && has_running_mean == has_tracked, op,
              ": running_mean, running_var and num_batches_tracked must all be given or all be None");
  if (has_running_mean) {
    check_float(*running_mean, "running_mean", {channels});
    check_float(*running_var, "running_var", {channels});
    check_same_dtype(*running_mean, *running_var, "running_mean and running_var");
    check_scalar_count(*num_batches_tracked, "num_batches_tracked");
  }
  check_float(mean, "mean", {channels});
  check_float(var, "var", {channels});
  check_float(batch_mean, "batch_mean", {channels});
  check_float(batch_var, "batch_var", {channels});
  return StateArguments{mode, slots, channels, has_running_mean};
}

}  // namespace cmbn
