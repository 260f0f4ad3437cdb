-- moe_gemm_sm90.lua - the grouped expert GEMMs of the fused MoE forward for Hopper (sm_90a):
-- wgmma m64nNk16 from 128-byte-swizzled shared memory (templates/moe_gemm_sm90.cu). Same entries,
-- parameters and semantics as moe_gemm_sm80 (read its header); the runtime derives gemm2's symbol
-- from the family name. Three pipelines (axis pipe):
--  - sync: every thread copies with cp.async, one CTA per tile (the launch of sm80);
--  - ws: warp-specialised (templates/common/moe_gemm_sm90_ws.cuh): a producer warpgroup (weights
--    and gemm2's A through the copy engine, gemm1's gathered rows with cp.async) and two or three
--    consumer warpgroups of 64 token rows; its GEMM entries take two tensor maps before the
--    parameter block (runtime/moe.c builds the maps) and run persistent or one CTA per tile;
--  - swap: the same roles with the operands swapped (templates/common/moe_gemm_sm90_swap.cuh):
--    consumers of 64 weight rows, the tile's tokens as the wgmma N, issued per tile with N = the
--    real rows rounded up to 16; weights and tokens in separate rings.
--
-- Axes compiled in: pipe, block_m (the token tile), block_n (the weight tile: gemm1 takes
-- block_n/2 gate and block_n/2 up rows), stages, x_stages (swap's token ring). block_k is 64 (the
-- swizzle atom's row). Launch-only axes as in sm80: group_m, split_k (gemm2), combine, ws_grid.

-- Consumer warpgroups of the warp-specialised pipelines: ws puts 64 token rows on each, swap 64
-- weight rows.
local function consumers(c)
  if c.pipe == "ws" then return c.block_m // 64 end
  if c.pipe == "swap" then return c.block_n // 64 end
  return 0
end

-- ws: + 1024 more for the 2 * stages mbarriers behind the ring, and with three consumers
-- (block_m 192) the producer's 6 KB table of gathered token indices. swap: its own rings,
-- stages of weights (block_n rows) and x_stages of tokens (block_m rows), the table of the
-- tile's token indices and each consumer's table of its tokens' slots and weights.
-- ws_tail = merge: the most real rows a merged slab holds (0: no merge). The kernel is compiled
-- with it (FM_WS_MERGE) and the alignment kernel must leave out of the tile list exactly the
-- tails this many rows or shorter, so the host passes it on from the launch facts. 48 as the
-- hybrid slab; 32 with clusters, whose consumers have 216 registers: gemm1 with 48 spilled 12
-- bytes there (bench/NOTES.md, tenth session).
local function merge_rows(c)
  if c.ws_tail ~= "merge" then return 0 end
  return c.ws_cluster > 1 and 32 or 48
end

local function smem(c)
  if c.pipe == "swap" then
    return c.stages * c.block_n * 128 + c.x_stages * c.block_m * 128 + 2048 + c.block_m * 4
      + consumers(c) * c.block_m * 8
  end
  return c.stages * (c.block_m + c.block_n + (c.ws_tail == "merge" and 64 or 0)) * 128
    + (c.pipe == "sync" and 1024 or 2048)
    + ((c.pipe == "ws" and c.block_m == 192) and 128 * 12 * 4 or 0)
end

return {
  name = "moe_gemm_sm90",
  op = "moe",
  template = "moe_gemm_sm90.cu",
  entry = "fm_moe_gemm1_sm90",
  entries = { "fm_moe_gemm1_sm90", "fm_moe_gemm2_sm90", "fm_moe_combine" },
  min_arch = 90,
  arch_suffix = "a", -- wgmma

  problem = {
    { name = "dtype", values = { "bf16", "fp16" } },
  },
  axes = {
    { name = "pipe", values = { "sync", "ws", "swap" } },
    -- The token tile (rows per tile; the alignment pads every expert to a multiple of it) and the
    -- weight tile (gemm1: block_n/2 gate and block_n/2 up rows; gemm2: block_n output columns).
    -- With pipe = swap the weights are the wgmma's M (64 rows per consumer warpgroup) and the
    -- tokens its N, issued per tile with N = the real rows rounded up to 16.
    { name = "block_m", values = { 64, 128, 192, 256 } },
    { name = "block_n", values = { 64, 128, 192, 256 } },
    { name = "stages", values = { 3, 4, 5, 6 } },
    -- M tiles per raster group (launch-only); 0, pipe ws and swap only: one group per expert (its
    -- M tiles walk its N tiles together, so each weight tile is read by all of them at once;
    -- see fm_moe::tile_coords). Named "ge".
    { name = "group_m", values = { 1, 8, 0 } },
    { name = "split_k", values = { 1, 2, 4 } },
    { name = "combine", values = { "slot", "atomic" } },
    -- pipe = ws only (launch-only): "persistent", one CTA per SM walking the tiles; or "tiles",
    -- one CTA per tile. ncu on H200 (T = 16384) showed the persistent GEMMs reading 3x the
    -- weight bytes from DRAM (L2 hit rate 42-45%): the CTAs that share a weight tile (the M
    -- tiles of one expert) drift apart over their rounds, while CTAs launched per tile start in
    -- raster order, side by side, every time.
    -- "dynamic" (pipe = ws): a persistent grid taking tiles in raster order from a counter, so
    -- that the tiles in flight stay neighbours (templates/common/moe_gemm_sm90_ws.cuh).
    { name = "ws_grid", values = { "persistent", "tiles", "dynamic" }, default = "persistent" },
    -- pipe = swap only: depth of the token ring (gathered from L2, lag x_stages - 2); stages is
    -- then the depth of the weight ring. A first version with 3 token stages lost 3% at T=1024
    -- on an H100 against one shared ring of 5 (bench/NOTES.md, MoE v5).
    { name = "x_stages", values = { 3, 4, 5 }, default = 3 },
    -- pipe = ws, one CTA per tile: 2 pairs the CTAs of neighbouring M tiles in a cluster; where
    -- both tiles belong to one expert each CTA copies half of every weight stage, multicast to
    -- both (templates/common/moe_gemm_sm90_ws.cuh): a third less L2 -> shared memory traffic,
    -- where ncu had the 128x256 GEMMs at 92% of L2 throughput (T = 16384). Measured on an H100
    -- (bench/NOTES.md, seventh session): 128x256 s4 3-4% faster with it and the best at
    -- T = 16384, but within 0.5% of the best unclustered variant; 128x128 10% slower.
    { name = "ws_cluster", values = { 1, 2 }, default = 1 },
    -- pipe = ws, one CTA per tile: "merge" runs an expert's last tile, when it holds at most 48
    -- real rows (32 with clusters), as a third, swapped slab of the tile before it, which
    -- shares its weight stages (each stage carries 64 more token rows); the last tile is
    -- skipped. With ~128 tokens per expert (DeepSeek-V3, T = 4096) about half of the experts
    -- have such a tile, each streaming the whole weight tile again for a few rows; uniform
    -- routing, which has none, ran 20% faster (bench/NOTES.md, ninth session).
    { name = "ws_tail", values = { "tile", "merge" }, default = "tile" },
  },

  constraints = {
    {
      -- The merged slab is split between two consumers by 64-row weight blocks (gemm1: a gate
      -- and an up block each), and written by the staged epilogue of a CTA's last tile.
      reason = "ws_tail = merge is for pipe = ws, ws_grid = tiles, the 128 x 256 tile and combine = slot",
      check = function(c)
        return c.ws_tail == "tile" or (c.pipe == "ws" and c.ws_grid == "tiles" and
          c.block_m == 128 and c.block_n == 256 and c.combine == "slot")
      end,
    },
    {
      -- The pair must be two M tiles of one N column: the raster walks groups of group_m M
      -- tiles per column, so an even group_m keeps every pair in one column (but the last,
      -- partial group's). Two consumers only: it is aimed at the 128x256 tile of large T.
      reason = "ws_cluster 2 is for pipe = ws, ws_grid = tiles, group_m 8 or per expert and block_m 128",
      check = function(c)
        return c.ws_cluster == 1 or (c.pipe == "ws" and c.ws_grid == "tiles" and
          (c.group_m == 8 or c.group_m == 0) and c.block_m == 128)
      end,
    },
    {
      -- Three consumers leave the gathering producer 32 registers: it spilled 640 bytes.
      reason = "ws_grid = dynamic is for pipe = ws with block_m 128",
      check = function(c) return c.ws_grid ~= "dynamic" or (c.pipe == "ws" and c.block_m == 128) end,
    },
    {
      reason = "group_m 0 (one raster group per expert) is for pipe = ws and swap",
      check = function(c) return c.group_m ~= 0 or c.pipe ~= "sync" end,
    },
    {
      -- sm_90a code (wgmma, "a" = architecture-specific) runs on compute capability 9.0 only.
      reason = "wgmma code is built for sm_90a and runs on compute capability 9.0 only",
      check = function(_, lim) return not lim.arch or lim.arch == 90 end,
    },
    {
      reason = function(c, lim)
        return string.format("needs %d bytes of shared memory, the device allows %d", smem(c),
          lim.smem_per_block or 0)
      end,
      check = function(c, lim) return not lim.smem_per_block or smem(c) <= lim.smem_per_block end,
    },
    {
      -- Two or three consumer warpgroups of 64 rows share each weight tile; the producer's
      -- gather covers the rows with 128 threads x block_m/16 chunks.
      reason = "pipe = ws takes block_m = 128 or 192",
      check = function(c) return c.pipe ~= "ws" or (c.block_m >= 128 and c.block_m <= 192) end,
    },
    {
      reason = "block_m = 256 is for pipe = swap (tokens on the wgmma N, at most 256)",
      check = function(c) return c.block_m ~= 256 or c.pipe == "swap" end,
    },
    {
      -- Two or three consumer warpgroups of 64 weight rows; gemm1's weight box is groups of 16
      -- rows (8 gate, 8 up).
      reason = "pipe = swap takes block_m >= 128 and block_n = 128 or 192",
      check = function(c)
        return c.pipe ~= "swap" or (c.block_m >= 128 and (c.block_n == 128 or c.block_n == 192))
      end,
    },
    {
      -- A thread of three consumers has 160 registers: 96 accumulators (N = 192) and addressing.
      reason = "pipe = swap with three consumers (block_n = 192) takes block_m <= 192",
      check = function(c) return c.pipe ~= "swap" or c.block_n ~= 192 or c.block_m <= 192 end,
    },
    {
      reason = "block_n = 192 is for pipe = swap",
      check = function(c) return c.block_n ~= 192 or c.pipe == "swap" end,
    },
    {
      -- Three consumers (160 registers each beside the 128 accumulators of m64n256) only pay
      -- where the tile is large enough to be limited by L2 traffic (bench/NOTES.md, MoE v3).
      reason = "block_m = 192 is for pipe = ws with block_n = 256, or pipe = swap",
      check = function(c)
        return c.block_m ~= 192 or (c.pipe == "ws" and c.block_n == 256) or c.pipe == "swap"
      end,
    },
    {
      reason = "ws_grid is for pipe = ws and swap (the sync pipeline launches one CTA per tile)",
      check = function(c) return c.pipe ~= "sync" or c.ws_grid == "persistent" end,
    },
    {
      reason = "pipe = ws takes block_n = 128 or 256",
      check = function(c) return c.pipe ~= "ws" or c.block_n >= 128 end,
    },
    {
      -- The persistent grid already covers the SMs; split-K would need a second reduction.
      reason = "pipe = ws and swap have no split-K",
      check = function(c) return c.pipe == "sync" or c.split_k == 1 end,
    },
    {
      -- 6 stages only pay off when one thread group does nothing but copy.
      reason = "stages = 6 is for pipe = ws and swap",
      check = function(c) return c.pipe ~= "sync" or c.stages <= 5 end,
    },
    {
      -- The producer publishes a gathered stage STAGES - 2 stages behind the one it fills.
      reason = "pipe = swap needs at least 3 stages",
      check = function(c) return c.pipe ~= "swap" or c.stages >= 3 end,
    },
    {
      reason = "x_stages is for pipe = swap (the other pipelines have one ring)",
      check = function(c) return c.pipe == "swap" or c.x_stages == 3 end,
    },
    {
      -- 64 x 64 warpgroup tiles leave the A tile reused by only 64 weight rows.
      reason = "block_n = 64 is for the weight-streaming tile (block_m = 64)",
      check = function(c) return c.block_n >= 128 or (c.block_m == 64 and c.pipe == "sync") end,
    },
    {
      reason = "split-K partial sums are added in fp32: needs combine=atomic",
      check = function(c) return c.split_k == 1 or c.combine == "atomic" end,
    },
    {
      -- Split-K fills the GPU at small T, where every routed expert has one tile.
      reason = "split-K is for the small-T tile (block_m = 64)",
      check = function(c) return c.split_k == 1 or c.block_m == 64 end,
    },
    {
      reason = "block_m = 64 uses combine=atomic only with split-K",
      check = function(c) return c.block_m >= 128 or c.combine == "slot" or c.split_k > 1 end,
    },
    {
      -- block_m = 64 serves the T where an expert has one or two tiles: nothing to group.
      reason = "group_m > 1 is for the large tiles (block_m >= 128)",
      check = function(c) return c.group_m == 1 or c.block_m >= 128 end,
    },
  },

  -- pipe = sync keeps the names it had before the axis existed (tuning databases refer to them).
  name_of = function(c)
    return string.format("moe_gemm_sm90_%s_m%d_n%d_s%d_g%s_sk%d_%s%s", c.dtype, c.block_m,
      c.block_n, c.stages, c.group_m == 0 and "e" or tostring(c.group_m), c.split_k, c.combine, c.pipe == "sync" and "" or "_" .. c.pipe)
      .. (c.x_stages ~= 3 and "_x" .. c.x_stages or "") .. (c.ws_grid == "tiles" and "_tiles" or "")
      .. (c.ws_grid == "dynamic" and "_dyn" or "")
      .. (c.ws_cluster == 1 and "" or "_cl" .. c.ws_cluster)
      .. (c.ws_tail == "merge" and "_mg" or "")
  end,

  defines = function(c)
    return {
      FM_DTYPE_BF16 = c.dtype == "bf16" and 1 or 0,
      FM_BLOCK_M = c.block_m,
      FM_BLOCK_N = c.block_n,
      FM_STAGES = c.stages,
      FM_MOE_WS = (c.pipe == "ws" and 1) or (c.pipe == "swap" and 2) or 0,
      FM_X_STAGES = c.pipe == "swap" and c.x_stages or nil,
      FM_WS_CLUSTER = c.ws_cluster ~= 1 and c.ws_cluster or nil,
      FM_WS_DYNAMIC = c.ws_grid == "dynamic" and 1 or nil,
      FM_WS_MERGE = c.ws_tail == "merge" and merge_rows(c) or nil,
    }
  end,

  launch = function(c) return { merge_rows = merge_rows(c) } end,

  threads = function(c)
    if c.pipe == "sync" then return c.block_m // 64 * 128 end
    return 128 * (1 + consumers(c))
  end,
  smem_bytes = smem,

  -- Untuned default (problem fields t, e, k, h, i, sms as for sm80). Rows per routed expert
  -- m = T*K / experts hit: up to 64 the layer streams weights: one warpgroup of 64 rows,
  -- 64 x 128 tiles, 4 stages (99 KB: two CTAs per SM keep ~190 KB of loads in flight), and
  -- split-K on gemm2 when its grid would not cover the SMs. Above, the 128 x 256 tile of two
  -- warpgroups (128 accumulators per thread, 3 stages = 146 KB): 2*128*256*64 FLOP per 48 KB
  -- stage, 85 FLOP/B.
  default = function(p, lim)
    local t, e, k, h = p.t or 1, p.e or 8, p.k or 1, p.h or 4096
    local sms = p.sms or 132
    local hit = math.min(e, t * k)
    local rows = t * k / hit
    local c = { pipe = "sync", group_m = 1, split_k = 1, combine = "slot", ws_grid = "persistent",
      x_stages = 3, ws_cluster = 1, ws_tail = "tile" }
    -- Measured on an H200 (DeepSeek-V3 shape, bench/NOTES.md): the warp-specialised 128 x 256
    -- tile won every bucket from T=1024 (32 rows per expert) up, launched one CTA per tile;
    -- three stages and group_m 8 were within 3% of each bucket's best (T = 1024, 4096, 16384);
    -- the weight-streaming 64-row tile won at T=16 (0.5 rows per expert).
    if rows <= 16 then
      c.block_m, c.block_n, c.stages = 64, 128, 4
      local ctas = math.max(1, hit) * ((h + c.block_n - 1) // c.block_n)
      for _, s in ipairs({ 2, 4 }) do
        if ctas * c.split_k >= sms then break end
        c.split_k = s
      end
      if c.split_k > 1 then c.combine = "atomic" end
    else
      -- H100 (seventh session): rastered one expert at a time (group_m 0) the tile read its
      -- weights once and won T=16384 by 5-9% over group_m 8; four stages led at 4096 and 16384.
      c.pipe, c.block_m, c.block_n, c.stages, c.group_m = "ws", 128, 256, 4, 0
      c.ws_grid = "tiles"
    end
    while c.stages > 3 and lim.smem_per_block and smem(c) > lim.smem_per_block do
      c.stages = c.stages - 1
    end
    return c
  end,
}
