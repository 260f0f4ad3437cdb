-- attn_ref.lua - the reference attention kernel (templates/attn_ref.cu): fp32 math, two passes
-- over the keys, used by the tuner to check variants on the GPU. It has no tuning axes.
--
-- Launch: grid (ceil(seqlen_q / 32), heads, batch) (a smaller grid.x also works: CTAs stride
-- over the 32-row blocks), 256 threads, no dynamic shared memory; arguments (params, o_ref,
-- lse_ref) with o_ref fp32 [B, Sq, H, D] and lse_ref fp32 [B, H, Sq] or NULL.

return {
  name = "attn_ref",
  op = "attn_ref",
  template = "attn_ref.cu",
  entry = "fm_attn_ref",
  min_arch = 80,
  arch_suffix = "",
  rows_per_cta = 32, -- grid.x = ceil(seqlen_q / rows_per_cta)

  problem = require("attn_problem"),
  axes = {},
  constraints = {},

  name_of = function(c)
    return string.format("attn_ref_%s_d%d_c%d", c.dtype, c.head_dim, c.causal)
  end,

  defines = function(c)
    return {
      FM_DTYPE_BF16 = c.dtype == "bf16" and 1 or 0,
      FM_HEAD_DIM = c.head_dim,
      FM_CAUSAL = c.causal,
    }
  end,

  threads = function(_) return 256 end,
  smem_bytes = function(_) return 0 end,
}
