// The CUDA emulation stands in for the toolkit header of this name (see csrc/emu/wmma.h).
#pragma once
#include "emu/wmma.h"
