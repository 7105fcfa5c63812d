// Pick ATen's Vectorized<float> width from the ISA this file is compiled for (setup.py passes
// -march=$FAST_UNET_CPU_ARCH, default native). Include this before any other ATen header in a CPU kernel.
#pragma once
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#ifndef CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY_AVX512
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY AVX512
#endif
#define FAST_UNET_VEC_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#ifndef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY_AVX2
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY AVX2
#endif
#define FAST_UNET_VEC_ISA "avx2"
#else
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define FAST_UNET_VEC_ISA "scalar"
#endif
#include <ATen/cpu/vec/vec.h>
