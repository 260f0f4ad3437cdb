-- attn_fwd_sm80.lua - FlashAttention-2 style attention forward on mma.sync (sm_80 and later).
-- Kernel: templates/attn_fwd_sm80.cu. Launch: grid (ceil(seqlen_q / block_m), heads, batch),
-- warps * 32 threads, smem_bytes(c) of dynamic shared memory.

-- Shared memory: the Q tile plus STAGES slots of one K and one V tile, rows of head_dim 16-bit
-- elements padded by 16 bytes (the template's kRowBytes).
local function smem_bytes(c)
  return (2 * c.head_dim + 16) * (c.block_m + 2 * c.stages * c.block_n)
end

local function rows_per_warp(c) return c.block_m // c.warps end

-- Registers a thread needs at the peak of the loop (S = Q K^T, all accumulators live):
--   O accumulators     rows_per_warp * head_dim / 32 fp32
--   S accumulators     rows_per_warp * block_n / 32 fp32
--   Q fragments        rows_per_warp * head_dim / 64, kept for the whole loop only when a warp
--                      has 16 rows and d <= 128 (the template's FM_Q_IN_REGS rule), else one
--                      k-step's worth, rows_per_warp / 4
--   K fragments        block_n / 4 (one k-step of every key tile in flight)
--   scalars            ~40: addresses, loop state, softmax statistics
-- ptxas (CUDA 13.0) uses 5-45 more registers than this because it hoists loads for latency,
-- but 255 separates the two groups on sm_80 and sm_90 alike: every configuration estimated at
-- <= 232 compiled with no spill (at most 246 registers), every one estimated >= 256 spilled
-- (32 rows x 64 keys at d=128: 16-64 bytes; 32 rows x 128 keys at d=64: 0-32 bytes; d=256 with
-- 32 rows: over 1 KiB).
local function reg_estimate(c)
  local rw = rows_per_warp(c)
  local q_in_regs = rw == 16 and c.head_dim <= 128
  local q = q_in_regs and (rw * c.head_dim // 64) or (rw // 4)
  return rw * c.head_dim // 32 + rw * c.block_n // 32 + q + c.block_n // 4 + 40
end

local F = {
  name = "attn_fwd_sm80",
  op = "attn_fwd",
  template = "attn_fwd_sm80.cu",
  entry = "fm_attn_fwd_sm80",
  min_arch = 80,
  arch_suffix = "",

  problem = require("attn_problem"),

  -- block_m: 64 or 128 query rows per CTA (more rows reuse each K/V tile more; fewer give more
  --   CTAs for short sequences and finer causal skipping).
  -- block_n: keys per tile (more keys per barrier pair and per softmax reduction, more
  --   S registers). 32 only where registers are short (see the constraint).
  -- warps: 4 or 8 (16 or 32 rows each, see the constraint).
  -- stages: depth of the K/V cp.async ring; 3 hides more latency when shared memory allows.
  axes = {
    { name = "block_m", values = { 64, 128 } },
    { name = "block_n", values = { 32, 64, 128 } },
    { name = "warps", values = { 4, 8 } },
    { name = "stages", values = { 2, 3 } },
  },

  constraints = {
    {
      reason = function(c)
        return string.format("block_m/warps = %d rows per warp; the kernel needs 16 or 32",
          rows_per_warp(c))
      end,
      check = function(c)
        return c.block_m % c.warps == 0 and (rows_per_warp(c) == 16 or rows_per_warp(c) == 32)
      end,
    },
    {
      reason = function(c)
        return string.format("needs ~%d registers per thread (255 max): would spill",
          reg_estimate(c))
      end,
      check = function(c) return reg_estimate(c) <= 255 end,
    },
    {
      reason = function(c, lim)
        return string.format("shared memory %d B exceeds the device's %d B per block",
          smem_bytes(c), lim.smem_per_block or 232448)
      end,
      -- Without device limits (compile-only runs) assume the largest target, H100/H200.
      check = function(c, lim) return smem_bytes(c) <= (lim.smem_per_block or 232448) end,
    },
    {
      reason = "block_n = 32 only where registers ask for it (head_dim 256, or 32 rows per " ..
        "warp at head_dim 128, where 64 keys spill): elsewhere it only doubles the barriers " ..
        "and softmax reductions per FLOP",
      check = function(c)
        return c.block_n ~= 32 or c.head_dim == 256 or
          (c.head_dim == 128 and rows_per_warp(c) == 32)
      end,
    },
  },

  name_of = function(c)
    return string.format("attn_fwd_sm80_%s_d%d_c%d_m%d_n%d_w%d_s%d", c.dtype, c.head_dim,
      c.causal, c.block_m, c.block_n, c.warps, c.stages)
  end,

  defines = function(c)
    return {
      FM_DTYPE_BF16 = c.dtype == "bf16" and 1 or 0,
      FM_HEAD_DIM = c.head_dim,
      FM_CAUSAL = c.causal,
      FM_BLOCK_M = c.block_m,
      FM_BLOCK_N = c.block_n,
      FM_WARPS = c.warps,
      FM_STAGES = c.stages,
    }
  end,

  -- Untuned default: FA2's own tile choices where our space has them (d=256: 128x64 with 8
  -- warps), 32 rows per warp at d=64 where registers allow it (each K/V fragment feeds two
  -- m-tiles), 16 rows per warp at d=128 (32 would spill at 64 keys). Not yet measured: the
  -- tuner's results replace it. space.c_default falls back to the first acceptable
  -- configuration when this one does not fit the device (d=256 on sm_80's 163 KiB).
  default = function(p)
    local t = ({
      [64] = { block_m = 128, block_n = 64, warps = 4, stages = 2 },
      [128] = { block_m = 128, block_n = 64, warps = 8, stages = 2 },
      [256] = { block_m = 128, block_n = 64, warps = 8, stages = 2 },
    })[p.head_dim]
    if not t then return nil end
    return { block_m = t.block_m, block_n = t.block_n, warps = t.warps, stages = t.stages }
  end,

  threads = function(c) return c.warps * 32 end,
  smem_bytes = smem_bytes,
}

return F
