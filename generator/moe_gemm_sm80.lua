-- moe_gemm_sm80.lua - the grouped expert GEMMs of the fused MoE forward for sm_80+
-- (templates/moe_gemm_sm80.cu: mma.sync m16n8k16, ldmatrix, cp.async multistage).
--
-- One configuration = one module with three entries sharing its tiles: fm_moe_gemm1_sm80 (the
-- loaded `fn`: gather + gate/up GEMM + SwiGLU), fm_moe_gemm2_sm80 (down GEMM + routing weight +
-- scatter) and fm_moe_combine. Launch sequence and grids: runtime/moe.c.
--
-- Axes (compiled in): block_m (padded rows per tile; the alignment pads every expert to it),
-- block_n (weight rows per tile: gemm1 takes block_n/2 gate + block_n/2 up rows and writes
-- block_n/2 intermediate columns, gemm2 writes block_n output columns), block_k, stages, warps.
-- Axes read by the launcher only (same kernel code): group_m (tile raster), split_k (gemm2
-- reduction split, partial sums added in fp32), combine ("slot": gemm2 writes weighted 16-bit
-- rows per slot and a combine kernel sums the K of each token, deterministic; "atomic": gemm2
-- adds into an fp32 [T, H] buffer with red.add, no K-fold slot buffer traffic, then a
-- conversion pass).
--
-- gemm1 has no split: SwiGLU needs the whole reduction, and it already has 2I/block_n times
-- more tiles than there are routed experts (>= 12 per expert tile at every preset), while
-- gemm2's H/block_n can leave SMs idle at small T (Mixtral T=1: 2 experts x 32 tiles).

local function warps_m(c) return c.block_m >= 32 and 2 or 1 end
local function warps_n(c) return c.warps // warps_m(c) end
local function smem(c) return c.stages * (c.block_m + c.block_n) * c.block_k * 2 end

return {
  name = "moe_gemm_sm80",
  op = "moe",
  template = "moe_gemm_sm80.cu",
  entry = "fm_moe_gemm1_sm80",
  entries = { "fm_moe_gemm1_sm80", "fm_moe_gemm2_sm80", "fm_moe_combine" },
  min_arch = 80,
  arch_suffix = "",

  problem = {
    { name = "dtype", values = { "bf16", "fp16" } },
  },
  axes = {
    { name = "block_m", values = { 16, 32, 64, 128 } },
    { name = "block_n", values = { 64, 128, 256 } },
    { name = "block_k", values = { 32, 64 } },
    { name = "stages", values = { 2, 3, 4, 5 } },
    { name = "warps", values = { 4, 8 } },
    { name = "group_m", values = { 1, 8 } },
    { name = "split_k", values = { 1, 2, 4 } },
    { name = "combine", values = { "slot", "atomic" } },
  },

  constraints = {
    {
      reason = "each warp needs a multiple of 16 weight rows (ldmatrix.x4 loads two n8 tiles)",
      check = function(c) return (c.block_n // warps_n(c)) % 16 == 0 end,
    },
    {
      -- block_m * block_n / threads fp32 accumulators per thread, plus ~40 registers of
      -- fragments and addresses: past 128 the 255-register file spills.
      reason = "more than 128 accumulators per thread (the tile would spill)",
      check = function(c) return c.block_m * c.block_n // (32 * c.warps) <= 128 end,
    },
    {
      -- Accumulators plus one k-step of fragments (4 per m16 tile of A, 2 per n8 tile of B,
      -- which ptxas keeps for several k-steps at once): past 160 the kernel spills (seen at
      -- 64x256 with 4 warps, a 32x128 warp tile: 128 + 8 + 32 = 168, 56-byte stack on sm_90).
      reason = "accumulators + fragments above 160 registers per thread (spills)",
      check = function(c)
        local mi = c.block_m // warps_m(c) // 16
        local ni = c.block_n // warps_n(c) // 8
        return mi * ni * 4 + mi * 4 + ni * 2 <= 160
      end,
    },
    {
      -- A warp must own a whole number of 16-row mma tiles along M.
      reason = "block_m rows per warp along M below 16",
      check = function(c) return c.block_m // warps_m(c) >= 16 end,
    },
    {
      reason = function(c, lim)
        return string.format("needs %d bytes of shared memory, the device allows %d", smem(c),
          lim.smem_per_block or 0)
      end,
      check = function(c, lim) return not lim.smem_per_block or smem(c) <= lim.smem_per_block end,
    },
    {
      reason = "split-K partial sums are added in fp32: needs combine=atomic",
      check = function(c) return c.split_k == 1 or c.combine == "atomic" end,
    },
    {
      -- Split-K pays off only while the grid is smaller than the GPU: small T, where each
      -- expert has one tile of few rows. With block_m >= 64 there are enough M-tiles already.
      reason = "split-K is for the small-T regime (block_m <= 32)",
      check = function(c) return c.split_k == 1 or c.block_m <= 32 end,
    },
    {
      -- Grouping M-tiles changes nothing when an expert has one M-tile (small block_m serves
      -- small T): the raster would be the plain one.
      reason = "group_m > 1 is for many M-tiles per expert (block_m >= 64)",
      check = function(c) return c.group_m == 1 or c.block_m >= 64 end,
    },
    -- The rest keeps the space to what each regime can use (every kept configuration is
    -- compiled by the tuner and by test_compile_all, ~1.5 s apiece). Small tiles
    -- (block_m <= 32) serve small T, where the layer streams expert weights; large tiles
    -- serve large T, where the tensor cores bound it.
    {
      reason = "a 16- or 32-row tile has too little work for 8 warps",
      check = function(c) return c.block_m >= 64 or c.warps == 4 end,
    },
    {
      -- At small T the slot buffer is a few KB: the atomic path pays only for split-K.
      reason = "block_m <= 32 uses combine=atomic only with split-K",
      check = function(c) return c.block_m >= 64 or c.combine == "slot" or c.split_k > 1 end,
    },
    {
      -- block_n = 64 halves the reuse of every A tile, which only the weight-streaming regime
      -- (more CTAs per expert tile) can afford.
      reason = "block_n = 64 is for small tiles (block_m <= 32)",
      check = function(c) return c.block_m <= 32 or c.block_n >= 128 end,
    },
    {
      -- Weight streaming needs bytes in flight: at least 2 tiles ahead. Large tiles: 3-4
      -- stages cover the L2 latency; 2 only where 99 KB devices leave no room for more.
      reason = function(c)
        return c.block_m <= 32 and "block_m <= 32 streams weights: 3 to 5 stages"
          or "block_m >= 64: 3 or 4 stages (2 only for block_m = 128)"
      end,
      check = function(c)
        if c.block_m <= 32 then return c.stages >= 3 end
        return c.stages <= 4 and (c.stages >= 3 or c.block_m == 128)
      end,
    },
    {
      -- 64-byte rows halve the bytes per cp.async sweep; kept for one case: 4 stages of the
      -- 128x256 tile in 96 KB, which fits the 99 KB of sm_86/sm_89 where block_k = 64 gets 2.
      reason = "block_k = 32 only for the 128x256 tile with 8 warps and 4 stages",
      check = function(c)
        return c.block_k == 64 or
          (c.block_m == 128 and c.block_n == 256 and c.warps == 8 and c.stages == 4)
      end,
    },
  },

  name_of = function(c)
    return string.format("moe_gemm_sm80_%s_m%d_n%d_k%d_s%d_w%d_g%d_sk%d_%s", c.dtype, c.block_m,
      c.block_n, c.block_k, c.stages, c.warps, c.group_m, c.split_k, c.combine)
  end,

  -- group_m, split_k and combine are launch parameters: they are not compiled in.
  defines = function(c)
    return {
      FM_DTYPE_BF16 = c.dtype == "bf16" and 1 or 0,
      FM_BLOCK_M = c.block_m,
      FM_BLOCK_N = c.block_n,
      FM_BLOCK_K = c.block_k,
      FM_STAGES = c.stages,
      FM_WARPS = c.warps,
    }
  end,

  threads = function(c) return c.warps * 32 end,
  smem_bytes = smem,

  -- The untuned default, per problem (the runtime passes t, e, k, h, i and sms, the SM count,
  -- with dtype). The regime is set by the rows each routed expert receives, m = T*K / experts
  -- hit: below ~64 rows every weight byte is used by few rows and the layer streams weights
  -- (memory-bound: small tiles, deep pipelines, enough CTAs to cover the SMs); above it the
  -- tensor cores bound it (the largest tile that keeps 128 accumulators per thread).
  default = function(p, lim)
    local t, e, k, h = p.t or 1, p.e or 8, p.k or 1, p.h or 4096
    local sms = p.sms or 132
    local hit = math.min(e, t * k)
    local rows = t * k / hit
    local c = { block_k = 64, group_m = 1, split_k = 1, combine = "slot" }
    if rows <= 16 then
      -- 16 x 128 tiles: 16 KB of weights per stage; 4 stages = 72 KB lets 3 CTAs share an
      -- H100 SM (~150 KB of loads in flight per SM, far above the ~40 KB that 3.35 TB/s
      -- times ~1.5 us of latency needs over 132 SMs).
      c.block_m, c.block_n, c.warps, c.stages = 16, 128, 4, 4
    elseif rows <= 32 then
      c.block_m, c.block_n, c.warps, c.stages = 32, 128, 4, 4
    elseif rows <= 96 then
      c.block_m, c.block_n, c.warps, c.stages, c.group_m = 64, 128, 4, 4, 8
    else
      -- 128 x 256 x 64, 8 warps of 64 x 64: 128 accumulators per thread, 48 KB per stage;
      -- 3 stages (144 KB) hide the L2 latency at one CTA per SM on A100 and H100.
      c.block_m, c.block_n, c.warps, c.stages, c.group_m = 128, 256, 8, 3, 8
    end
    -- Fit the device's shared memory (99 KB on sm_86/89) by giving up stages.
    while c.stages > 2 and lim.smem_per_block and smem(c) > lim.smem_per_block do
      c.stages = c.stages - 1
    end
    -- gemm2 has (tiles) x ceil(H / block_n) CTAs; at small T that can be under one wave.
    if c.block_m <= 32 then
      local tiles = math.max(1, hit)
      local ctas = tiles * ((h + c.block_n - 1) // c.block_n)
      for _, s in ipairs({ 2, 4 }) do
        if ctas * c.split_k >= sms then break end
        c.split_k = s
      end
      if c.split_k > 1 then c.combine = "atomic" end
    end
    return c
  end,
}
