// Stub for the CPU emulation (kernels/emu): the bf16 types and conversions are in emu.h.
#pragma once
#include "emu.h"
