// The kernels of kernels/*.cu compiled for the CPU emulation (emu.h), and their registry: one
// entry per __global__ kernel with its __launch_bounds__ (0: none), as an X-macro so that the
// kernel test (tests/kernel_emu/run.cpp) and the emulated device (kernels/emu/device.cpp) share one
// list. A kernel missing here is refused by the emulated device's lookup as the driver would refuse
// an unknown name; keep it in step with kernels/*.cu.
#pragma once
#include "emu.h"

// The dynamic shared-memory arrays the kernels declare `extern __shared__` (page-aligned, larger than
// any launch; the bytes past a launch's size are checked to stay untouched). Defined before the
// kernels so that their block-scope `extern thread_local` declarations need no TLS init wrapper.
constexpr size_t DYN_SMEM_CAP = 232 * 1024;
thread_local __attribute__((aligned(4096))) float att_smem_f32[DYN_SMEM_CAP / 4];
thread_local __attribute__((aligned(4096))) unsigned char att_smem_bf16[DYN_SMEM_CAP];
thread_local __attribute__((aligned(4096))) unsigned char conv_smem[DYN_SMEM_CAP];
// Their (Itanium ABI) TLS init functions, which have nothing to do: a block-scope `extern
// thread_local` makes the compiler call the weak symbol, and g++ 12 calls it without checking that
// it exists inside template instances (a call to address 0). -fno-extern-tls-init avoids it too.
extern "C" void _ZTH12att_smem_f32() {}
extern "C" void _ZTH13att_smem_bf16() {}
extern "C" void _ZTH9conv_smem() {}
// Registers the arrays above with the emulator, in each thread that runs kernels.
inline void register_kernel_dynamic_smem() {
    emu::register_dynamic_smem(att_smem_f32, sizeof att_smem_f32);
    emu::register_dynamic_smem(att_smem_bf16, sizeof att_smem_bf16);
    emu::register_dynamic_smem(conv_smem, sizeof conv_smem);
}

#include "../common.cuh"
#include "../attention.cu"
#include "../attention_v2.cu"
#include "../conv.cu"
#include "../conv_pipeline.cu"
#include "../elementwise.cu"
#include "../linear.cu"
#include "../norm.cu"
#include "../optim.cu"
#include "../pool.cu"
#include "../random.cu"

// K(kernel, launch bound) for each kernel; KAB(H) for the three bf16 attention kernels of head dim H.
#define ROENTGEN_EMU_KERNELS(K, KAB) \
    K(conv2d_weight_permute, 256) \
    K(conv2d_weight_permute_bf16, 256) \
    K(conv2d_weight_permute_bf16_copy, 256) \
    K(ew_to_bf16, 0) \
    K(ew_widen_bf16, 0) \
    K(ew_timestep_embedding, 0) \
    K(ew_timestep_embedding_bf16, 0) \
    K(conv2d_igemm_f32, 256) \
    K(conv2d_igemm_bf16, 256) \
    K(conv2d_igemm_bf16_splitk, 256) \
    K(conv2d_igemm_bf16_v3, 256) \
    K(conv2d_igemm_bf16_splitk_v3, 256) \
    K(conv2d_igemm_bf16_v4, 256) \
    K(conv2d_igemm_bf16_splitk_v4, 256) \
    K(conv2d_igemm_bf16_v5, 256) \
    K(conv2d_igemm_bf16_splitk_v5, 256) \
    K(conv2d_igemm_bf16_v6, 256) \
    K(conv2d_igemm_bf16_splitk_v6, 256) \
    K(conv2d_splitk_reduce, 0) \
    K(conv2d_wgrad_f32, 256) \
    K(conv2d_wgrad_bf16, 256) \
    K(conv2d_bias_grad, 256) \
    K(conv2d_im2col, 0) \
    K(attention_bwd_delta, 256) \
    K(attention_fwd_f32, AF_THREADS) \
    K(attention_bwd_dq_f32, AF_THREADS) \
    K(attention_bwd_dkdv_f32, AF_THREADS) \
    K(attention_wide_softmax, AW_THREADS) \
    K(attention_fwd_bf16_v2_d8, attn_v2::THREADS) \
    K(attention_fwd_bf16_v2_d16, attn_v2::THREADS) \
    K(attention_fwd_bf16_v2_d24, attn_v2::THREADS) \
    K(attention_fwd_bf16_v2_d32, attn_v2::THREADS) \
    K(attention_fwd_bf16_v2_d40, attn_v2::THREADS) \
    K(attention_fwd_bf16_v2_d48, attn_v2::THREADS) \
    K(attention_fwd_bf16_v2_d56, attn_v2::THREADS) \
    K(attention_fwd_bf16_v2_d64, attn_v2::THREADS) \
    K(attention_fwd_bf16_v2_d72, attn_v2::THREADS) \
    K(attention_fwd_bf16_v2_d80, attn_v2::THREADS) \
    K(attention_fwd_bf16_v2_d88, attn_v2::THREADS) \
    K(attention_fwd_bf16_v2_d96, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d8, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d16, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d24, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d32, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d40, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d48, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d56, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d64, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d72, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d80, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d88, attn_v2::THREADS) \
    K(attention_fwd_bf16_v3_d96, attn_v2::THREADS) \
    K(attention_wide_bwd_ds, AW_THREADS) \
    K(ln_forward, 0) \
    K(ln_forward_bf16, 0) \
    K(ln_backward_dinp, 0) \
    K(nrm_dparams_partial, 0) \
    K(nrm_dparams_finalize, 0) \
    K(gn_forward_sum, 0) \
    K(gn_forward_sum_bf16, 0) \
    K(gn_forward_sqdev, 0) \
    K(gn_forward_sqdev_bf16, 0) \
    K(gn_forward_finalize, 0) \
    K(gn_forward_apply, 0) \
    K(gn_forward_apply_bf16, 0) \
    K(gn_forward_moments_v2, 0) \
    K(gn_forward_moments_bf16_v2, 0) \
    K(gn_forward_apply_v2, 0) \
    K(gn_forward_apply_bf16_v2, 0) \
    K(gn_backward_reduce, 0) \
    K(gn_backward_finalize, 0) \
    K(gn_backward_dinp, 0) \
    K(gn_backward_dinp_v2, 0) \
    K(bn_forward, 0) \
    K(bn_train_partial, 0) \
    K(bn_train_stats, 0) \
    K(bn_train_dparams, 0) \
    K(bn_train_dinp, 0) \
    K(pool2d_fwd, 0) \
    K(pool2d_bwd, 0) \
    K(ew_activation_fwd, 0) \
    K(ew_activation_fwd_bf16, 0) \
    K(ew_activation_bwd, 0) \
    K(ew_add, 0) \
    K(ew_add_bf16, 0) \
    K(ew_add_bias_rows, 0) \
    K(ew_add_bias_rows_bf16, 0) \
    K(ew_bias_rows_bwd_partial, 0) \
    K(ew_bias_rows_bwd_finalize, 0) \
    K(ew_concat_fwd, 0) \
    K(ew_concat_fwd_bf16, 0) \
    K(ew_concat_bwd, 0) \
    K(ew_geglu_fwd, 0) \
    K(ew_geglu_fwd_bf16, 0) \
    K(ew_geglu_bwd, 0) \
    K(ew_upsample_fwd, 0) \
    K(ew_upsample_fwd_bf16, 0) \
    K(ew_upsample_bwd, 0) \
    K(ew_embedding_fwd, 0) \
    K(ew_embedding_bwd, 0) \
    K(ew_zero, 0) \
    K(ew_zero_bf16, 0) \
    K(ew_accumulate, 0) \
    K(ew_accumulate_bf16, 0) \
    K(ew_scale, 0) \
    K(ew_lerp, 0) \
    K(opt_mse_partial, 0) \
    K(opt_sum_squares_partial, 0) \
    K(opt_sum_finalize, 0) \
    K(opt_adamw, 0) \
    K(rand_philox_normal, 0) \
    K(rand_ddpm_add_noise, 0) \
    K(linear_bias_fill, 0) \
    K(linear_bias_fill_bf16, 0) \
    K(linear_bias_grad, 0) \
    KAB(16) \
    KAB(32) \
    KAB(48) \
    KAB(64) \
    KAB(80) \
    KAB(96) \
    KAB(112) \
    KAB(128) \
    KAB(144) \
    KAB(160)
