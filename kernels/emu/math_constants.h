// Stub for the CPU emulation (kernels/emu).
#pragma once
#include "emu.h"
#define CUDART_INF_F __builtin_huge_valf()
#define CUDART_NAN_F __builtin_nanf("")
#define CUDART_INF __builtin_huge_val()
#define CUDART_PI_F 3.141592654f
