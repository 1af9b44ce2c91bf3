from linmu.bench.layer_scaling import _category


def test_profile_categories_keep_cudnn_attention_out_of_gemms():
    # names as the CUDA profiler printed them on the H200 (docs/BENCHMARKS.md)
    assert _category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128") \
        == "window attention"
    assert _category("nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_bias_TNN") == "gemm"
    assert _category("chunk_fwd_kernel_o") == "fla scans"
    assert _category("conv_kernel") == "fused elementwise"
    assert _category("void at::native::index_elementwise_kernel<128, 4>") == "other (gathers, small elementwise)"
