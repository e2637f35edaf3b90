// The CUDA emulation stands in for the toolkit header of this name (see csrc/emu/cuda_emu.h): the
// grid group of a cooperative launch, whose sync() is the emulation's grid barrier.
#pragma once
#include "emu/cuda_emu.h"

namespace cooperative_groups {

class grid_group {
 public:
  void sync() const { ::nf_emu::grid_sync(); }
};

inline grid_group this_grid() { return grid_group{}; }

}  // namespace cooperative_groups
