-- moe_ref.lua - the reference MoE forward and the tuner's input/compare helpers
-- (templates/moe_ref.cu): fp32 formulas, no tuning axes. Entries: fm_moe_ref_route,
-- fm_moe_ref_ffn1, fm_moe_ref_ffn2, fm_moe_fill, fm_moe_compare (the loaded `fn` is the first;
-- the others come from the same module by name).
--
-- Launch: 256 threads, no dynamic shared memory; grids in the template's header comment.

return {
  name = "moe_ref",
  op = "moe_ref",
  template = "moe_ref.cu",
  entry = "fm_moe_ref_route",
  min_arch = 80,
  arch_suffix = "",

  problem = {
    { name = "dtype", values = { "bf16", "fp16" } },
  },
  axes = {},
  constraints = {},

  name_of = function(c) return "moe_ref_" .. c.dtype end,
  defines = function(c) return { FM_DTYPE_BF16 = c.dtype == "bf16" and 1 or 0 } end,
  threads = function(_) return 256 end,
  smem_bytes = function(_) return 0 end,
}
