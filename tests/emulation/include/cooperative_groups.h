#pragma once
// Emulated stand-in for CUDA's header: the grid of a cooperative launch and its barrier
// (cuda_runtime.h runs it). A kernel launched with <<<>>> that reaches this_grid().sync() fails its
// launch; CMBN_EMULATION_SKIP_GRID_SYNC=1 makes the barrier do nothing, to show what depends on it.

namespace cooperative_groups {

class grid_group {
 public:
  // Every thread of every block of the grid arrives before any goes on.
  void sync() const { ::cmbn_emu::sync_grid(); }
  // Whether the kernel was launched cooperatively (else sync() is not allowed).
  bool is_valid() const { return ::cmbn_emu::scheduler().cooperative; }
};

inline grid_group this_grid() { return grid_group(); }

}  // namespace cooperative_groups
