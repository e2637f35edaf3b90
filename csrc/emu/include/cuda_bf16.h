// The CUDA emulation stands in for the toolkit header of this name (see csrc/emu/cuda_emu.h).
#pragma once
#include "emu/cuda_emu.h"
