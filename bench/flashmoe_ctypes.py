"""flashmoe_ctypes.py - the public C API of libflashmoe, seen from Python through ctypes.

Used by the benchmarks so that flashmoe and the PyTorch baselines run in the same process, on the
same card, on the same tensors. Mirrors runtime/flashmoe.h; keep the two in step.
"""
import ctypes
import os

FM_DTYPE_BF16, FM_DTYPE_FP16 = 0, 1


class AttentionArgs(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_int),
        ("batch", ctypes.c_int), ("seqlen_q", ctypes.c_int), ("seqlen_k", ctypes.c_int),
        ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int),
        ("causal", ctypes.c_int),
        ("softmax_scale", ctypes.c_float),
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("o", ctypes.c_void_p), ("lse", ctypes.c_void_p),
        ("q_stride", ctypes.c_int64 * 3), ("k_stride", ctypes.c_int64 * 3),
        ("v_stride", ctypes.c_int64 * 3), ("o_stride", ctypes.c_int64 * 3),
        ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t),
    ]


class Selection(ctypes.Structure):
    _fields_ = [("config", ctypes.c_char * 160), ("source", ctypes.c_int),
                ("tuned_shape", ctypes.c_char * 256)]


class MoeArgs(ctypes.Structure):
    _fields_ = [
        ("dtype", ctypes.c_int),
        ("tokens", ctypes.c_int), ("hidden", ctypes.c_int), ("intermediate", ctypes.c_int),
        ("experts", ctypes.c_int), ("topk", ctypes.c_int),
        ("routing", ctypes.c_int), ("renormalize", ctypes.c_int),
        ("n_group", ctypes.c_int), ("topk_group", ctypes.c_int),
        ("routed_scaling_factor", ctypes.c_float),
        ("hidden_states", ctypes.c_void_p), ("router_logits", ctypes.c_void_p),
        ("correction_bias", ctypes.c_void_p), ("w13", ctypes.c_void_p), ("w2", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("topk_ids", ctypes.c_void_p), ("topk_weights", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t),
    ]


class FlashMoE:
    def __init__(self, lib_path, device=0, shipped_db=None):
        """shipped_db: the shipped database this context reads instead of FLASHMOE_SHIPPED_DB's
        (the variable is read when a context is created), e.g. for the A/B of a database
        change with the same library file loaded twice."""
        self.lib = ctypes.CDLL(os.path.abspath(lib_path))
        L = self.lib
        L.fm_context_create.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        L.fm_last_error.restype = ctypes.c_char_p
        L.fm_last_error.argtypes = [ctypes.c_void_p]
        L.fm_attention_fwd.argtypes = [ctypes.c_void_p, ctypes.POINTER(AttentionArgs), ctypes.c_void_p]
        L.fm_attention_select.argtypes = [ctypes.c_void_p, ctypes.POINTER(AttentionArgs),
                                          ctypes.POINTER(Selection)]
        L.fm_moe_fwd.argtypes = [ctypes.c_void_p, ctypes.POINTER(MoeArgs), ctypes.c_void_p]
        L.fm_attention_workspace_size.argtypes = [ctypes.c_void_p, ctypes.POINTER(AttentionArgs),
                                                  ctypes.POINTER(ctypes.c_size_t)]
        L.fm_moe_workspace_size.argtypes = [ctypes.c_void_p, ctypes.POINTER(MoeArgs),
                                            ctypes.POINTER(ctypes.c_size_t)]
        L.fm_version.restype = ctypes.c_char_p
        self.ctx = ctypes.c_void_p()
        saved = os.environ.get("FLASHMOE_SHIPPED_DB")
        if shipped_db:
            os.environ["FLASHMOE_SHIPPED_DB"] = os.path.abspath(shipped_db)
        try:
            s = L.fm_context_create(ctypes.byref(self.ctx), device)
        finally:
            if saved is None:
                os.environ.pop("FLASHMOE_SHIPPED_DB", None)
            else:
                os.environ["FLASHMOE_SHIPPED_DB"] = saved
        if s != 0:
            raise RuntimeError("fm_context_create: %s" % L.fm_last_error(None).decode())

    def error(self):
        return self.lib.fm_last_error(self.ctx).decode()

    def attention_args(self, q, k, v, o, causal, lse=None):
        """q [B, Sq, H, D], k/v [B, Sk, Hkv, D], o like q: torch tensors, head dim contiguous.
        Passes a workspace (one per head dim, kept on this object), as a serving caller would."""
        import torch
        a = AttentionArgs()
        a.dtype = FM_DTYPE_BF16 if q.dtype == torch.bfloat16 else FM_DTYPE_FP16
        a.batch, a.seqlen_q, a.heads, a.head_dim = q.shape
        a.seqlen_k, a.kv_heads = k.shape[1], k.shape[2]
        a.causal = 1 if causal else 0
        a.softmax_scale = 0.0
        a.q, a.k, a.v, a.o = q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr()
        a.lse = lse.data_ptr() if lse is not None else None
        for name, t in (("q_stride", q), ("k_stride", k), ("v_stride", v), ("o_stride", o)):
            st = getattr(a, name)
            st[0], st[1], st[2] = t.stride(0), t.stride(1), t.stride(2)
        size = ctypes.c_size_t(0)
        if self.lib.fm_attention_workspace_size(self.ctx, ctypes.byref(a), ctypes.byref(size)) != 0:
            raise RuntimeError("fm_attention_workspace_size: %s" % self.error())
        if size.value:
            ws = getattr(self, "_attn_ws", {})
            self._attn_ws = ws
            if a.head_dim not in ws:
                ws[a.head_dim] = torch.empty(size.value, dtype=torch.uint8, device=q.device)
            a.workspace, a.workspace_bytes = ws[a.head_dim].data_ptr(), size.value
        return a

    def attention(self, args, stream):
        s = self.lib.fm_attention_fwd(self.ctx, ctypes.byref(args), ctypes.c_void_p(stream))
        if s != 0:
            raise RuntimeError("fm_attention_fwd: %s" % self.error())

    def select(self, args):
        sel = Selection()
        s = self.lib.fm_attention_select(self.ctx, ctypes.byref(args), ctypes.byref(sel))
        if s != 0:
            raise RuntimeError("fm_attention_select: %s" % self.error())
        return sel.config.decode(), ("exact", "nearest", "default", "other_dtype")[sel.source], sel.tuned_shape.decode()
