#!/usr/bin/env python3
"""Write tiny quantized checkpoints (AWQ, GPTQ, compressed-tensors, FP8) with float32 references.

Usage (torch, transformers, compressed-tensors, safetensors and numpy are only needed here):
    .cache/refvenv/bin/python scripts/make_quant_fixtures.py [name ...]

The source is the tiny random Llama of scripts/make_model_fixtures.py (fixtures/models/llama:
hidden 64, intermediate 128, 2 layers, vocab 256). Every q/k/v/o/gate/up/down_proj of every layer
is quantized by round-to-nearest (no calibration); embeddings, norms and lm_head stay float32.
Each format is written to fixtures/quant/<name>/ as config.json (the Llama config plus a
`quantization_config`), model.safetensors and reference.json. reference.json has the layout of
fixtures/models/llama/reference.json (`cases`: prompt ids, per-position float32 logits, 16 greedy
tokens) computed by transformers in float32 on the *dequantized twin*: the source model with
each quantized weight replaced by `scale * (q - zero)` evaluated in float32 from the stored
integers and scales (FP8: the e4m3 value times its scale).

Quantization, per group of input channels of a weight W [out, in]:
  asymmetric 4-bit: s = f16((max - min) / 15), z = clamp(round(-min / s), 0, 15),
                    q = clamp(round(W / s) + z, 0, 15)
  symmetric 4-bit:  s = f16(max|W| / 7),   z = 8,   q = clamp(round(W / s) + 8, 0, 15)
  symmetric 8-bit:  s = f16(max|W| / 127), z = 128, q = clamp(round(W / s) + 128, 0, 255)
  FP8 (e4m3):       s = f16(max|W| / 448) per row or per block, v = e4m3(clamp(W / s, -448, 448))
Every scale is a float16 value, also where it is stored as float32, so every dequantized weight
s * (q - z) (or s * v) is exact in float32 whatever the order of the operations.

Integers shared between fixtures (the same quantization stored several ways, so an engine must
give identical logits for them; reference.json lists them under `same_integers_as`):
  asymmetric 4-bit g32: awq_g32, gptq_g32_asym, gptq_v2_g32, ct_w4a16_asym_group
  symmetric 4-bit g32:  gptq_g32_sym, ct_w4a16_group
  symmetric 8-bit per output channel: ct_w8a16_channel, ct_w8a8_int
ct_w8a8_int's reference.json also has `cases_dynamic_int8_activations`: the same prompts with
each quantized linear's input fake-quantized per token (symmetric int8, scale max|x| / 127,
round half to even), as the checkpoint's dynamic per-token activation scheme asks.

Every packing is checked before it is written: compressed-tensors tensors are unpacked and
dequantized by compressed_tensors itself (unpack_from_int32, dequantize); AWQ and GPTQ by an
independent unpacker written after AutoAWQ's unpack_awq/reverse_awq_order/dequantize_gemm and
AutoGPTQ's QuantLinear (torch) dequantization; FP8 by the e4m3 round trip times the scale. Each
result must equal the twin's weight exactly, and the shared-integer fixtures must unpack to the
same integers, zeros and scales. After writing, each compressed-tensors and FP8 fixture is also
loaded by transformers' own integration (CompressedTensorsConfig / FineGrainedFP8Config with
dequantize=True) and its logits must match reference.json.

Besides the brief's formats, fp8_block_16x32 (weight_block_size [16, 32]) has several blocks per
weight; with [128, 128] (fp8_block) every weight of this model is a single, partial block.

Bad checkpoints for error tests (no reference.json): ct_w4a16_ignore_mismatch (an `ignore`
regex that matches nothing), bad_awq_missing_scales, bad_gptq_bits3, bad_unknown_method,
bad_fp8_no_scale, bad_awq_group_shape.
"""
import copy
import hashlib
import json
import os
import sys
import warnings

import numpy as np
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import dequantize

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SRC = os.path.join(ROOT, "fixtures", "models", "llama")
OUT = os.path.join(ROOT, "fixtures", "quant")
PROMPTS = [[1, 17, 200, 3, 45, 99, 120, 7, 64, 31], [5, 250, 11], [42, 42, 8, 190, 77, 2]]  # as make_model_fixtures.py
NEW_TOKENS = 16
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]          # AutoAWQ order_map: nibble j holds column 8c + ORDER[j]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # AutoAWQ packing_utils.AWQ_REVERSE_ORDER
FP8_MAX = 448.0
SEED = 1234


# ---------------------------------------------------------------------------------------------
# Quantization (one object per weight: integers, zeros and scales per group, group of each channel)

def f16(x):
    return x.to(torch.float16).to(torch.float32)


class Quant:
    """q [out, in] int64 in [0, 2^bits), z [out, G] int64, s [out, G] float32 (float16 values),
    g_idx [in] int64 (group of each input channel), bits, group (size; -1 for one group)."""

    def __init__(self, q, z, s, g_idx, bits, group):
        self.q, self.z, self.s, self.g_idx, self.bits, self.group = q, z, s, g_idx, bits, group

    def twin(self):
        """The dequantized weight, s * (q - z) in float32."""
        return self.s[:, self.g_idx] * (self.q - self.z[:, self.g_idx]).to(torch.float32)


def groups_of(n_in, group, perm=None):
    """Members [G, gsize] of each group and g_idx [in]. With `perm` (act order), channel
    perm[k] is in group k // group; otherwise channel i is in group i // group."""
    gs = n_in if group == -1 else group
    assert n_in % gs == 0
    order = torch.arange(n_in) if perm is None else perm
    members = order.view(-1, gs)
    g_idx = torch.empty(n_in, dtype=torch.int64)
    g_idx[order] = torch.arange(n_in) // gs
    return members, g_idx


def quantize_int(w, bits, group, sym, perm=None):
    out, n_in = w.shape
    members, g_idx = groups_of(n_in, group, perm)
    qmax = (1 << bits) - 1
    q = torch.empty(out, n_in, dtype=torch.int64)
    z = torch.empty(out, members.shape[0], dtype=torch.int64)
    s = torch.empty(out, members.shape[0], dtype=torch.float32)
    for g, idx in enumerate(members):
        wg = w[:, idx]
        if sym:
            zg = torch.full((out,), 1 << (bits - 1), dtype=torch.int64)
            sg = f16(wg.abs().amax(1) / ((1 << (bits - 1)) - 1))
        else:
            sg = f16((wg.amax(1) - wg.amin(1)) / qmax)
            assert (sg > 0).all()
            zg = torch.clamp(torch.round(-wg.amin(1) / sg), 0, qmax).to(torch.int64)
        assert (sg > 0).all()
        q[:, idx] = torch.clamp(torch.round(wg / sg[:, None]).to(torch.int64) + zg[:, None], 0, qmax)
        z[:, g], s[:, g] = zg, sg
    return Quant(q, z, s, g_idx, bits, group)


def quantize_fp8(w, block=None):
    """(e4m3 weight, float32 scale): per output row when block is None, else per
    [block[0], block[1]] block (scale [ceil(out/b0), ceil(in/b1)])."""
    out, n_in = w.shape
    if block is None:
        s = f16(w.abs().amax(1, keepdim=True) / FP8_MAX)
        full = s.expand(out, n_in)
    else:
        b0, b1 = block
        nr, nc = -(-out // b0), -(-n_in // b1)
        s = torch.empty(nr, nc, dtype=torch.float32)
        for r in range(nr):
            for c in range(nc):
                s[r, c] = f16(w[r * b0:(r + 1) * b0, c * b1:(c + 1) * b1].abs().amax() / FP8_MAX)
        full = s.repeat_interleave(b0, 0)[:out].repeat_interleave(b1, 1)[:, :n_in]
    assert (s > 0).all()
    v = torch.clamp(w / full, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return v, s.contiguous(), v.to(torch.float32) * full


# ---------------------------------------------------------------------------------------------
# Packing (numpy uint32, then reinterpreted as int32 as the checkpoints store it)

def pack_rows(vals, bits, order=None):
    """Pack along dim 1: word [r, c] holds vals[r, c*per + order[j]] at bits bits*j."""
    v = np.asarray(vals, dtype=np.uint32)
    per = 32 // bits
    order = list(range(per)) if order is None else order
    assert v.shape[1] % per == 0 and v.max() < (1 << bits)
    words = np.zeros((v.shape[0], v.shape[1] // per), dtype=np.uint32)
    for j in range(per):
        words |= v[:, order[j]::per] << np.uint32(bits * j)
    return torch.from_numpy(words.view(np.int32).copy())


def awq_tensors(p, qz):
    assert qz.bits == 4
    return {p + ".qweight": pack_rows(qz.q.T.numpy(), 4, AWQ_ORDER),             # [in, out/8]
            p + ".qzeros": pack_rows(qz.z.T.numpy(), 4, AWQ_ORDER),              # [G, out/8]
            p + ".scales": qz.s.T.contiguous().to(torch.float16)}                # [G, out]


def gptq_tensors(p, qz, v2=False):
    mask = (1 << qz.bits) - 1
    zeros = qz.z.T.numpy() if v2 else qz.z.T.numpy() - 1
    assert zeros.min() >= 0, "GPTQ v1 cannot store a zero point of 0"
    return {p + ".qweight": pack_rows(qz.q.numpy(), qz.bits).T.contiguous(),      # [in*bits/32, out]
            p + ".qzeros": pack_rows(zeros & mask, qz.bits),                    # [G, out*bits/32]
            p + ".scales": qz.s.T.contiguous().to(torch.float16),                # [G, out]
            p + ".g_idx": qz.g_idx.to(torch.int32)}                             # [in]


def ct_packed_tensors(p, qz, sym):
    off = 1 << (qz.bits - 1)
    t = {p + ".weight_packed": pack_to_int32((qz.q - off).to(torch.int8), qz.bits),  # [out, in*bits/32]
         p + ".weight_scale": qz.s.clone(),                                            # [out, G] float32
         p + ".weight_shape": torch.tensor(list(qz.q.shape), dtype=torch.int64)}
    if not sym:
        t[p + ".weight_zero_point"] = pack_to_int32((qz.z - off).to(torch.int8), qz.bits, packed_dim=0)
    return t


def ct_int8_tensors(p, qz):
    return {p + ".weight": (qz.q - 128).to(torch.int8), p + ".weight_scale": qz.s.clone()}


# ---------------------------------------------------------------------------------------------
# Independent unpacking (checks), returning (q [out, in], z [out, G], s [out, G], w [out, in])

def shifts(bits):
    return torch.arange(0, 32, bits, dtype=torch.int32)


def unpack_awq(t, p, group):
    """After AutoAWQ awq/utils/packing_utils.py: unpack_awq, reverse_awq_order, dequantize_gemm."""
    qweight, qzeros, scales = t[p + ".qweight"], t[p + ".qzeros"], t[p + ".scales"]
    sh = shifts(4)
    iw = ((qweight[:, :, None] >> sh[None, None, :]) & 0xF).reshape(qweight.shape[0], -1)
    iz = ((qzeros[:, :, None] >> sh[None, None, :]) & 0xF).reshape(qzeros.shape[0], -1)
    rev = torch.arange(iw.shape[1]).view(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
    iw, iz = iw[:, rev], iz[:, rev]
    gs = qweight.shape[0] if group == -1 else group
    s = scales.to(torch.float32)
    w = (iw - iz.repeat_interleave(gs, 0)).to(torch.float32) * s.repeat_interleave(gs, 0)
    return iw.T.long(), iz.T.long(), s.T, w.T


def unpack_gptq(t, p, bits, v2):
    """After AutoGPTQ's QuantLinear dequantization (qlinear_cuda_old / exllama torch path)."""
    qweight, qzeros, scales, g_idx = t[p + ".qweight"], t[p + ".qzeros"], t[p + ".scales"], t[p + ".g_idx"]
    mask, sh = (1 << bits) - 1, shifts(bits)
    zeros = ((qzeros[:, :, None] >> sh[None, None, :]) & mask).reshape(qzeros.shape[0], -1)
    if not v2:
        zeros = zeros + 1
    weight = ((qweight[:, None, :] >> sh[None, :, None]) & mask).reshape(-1, qweight.shape[1])
    gi = g_idx.long()
    s = scales.to(torch.float32)
    w = s[gi] * (weight - zeros[gi]).to(torch.float32)
    return weight.T.long(), zeros.T.long(), s.T, w.T


def unpack_ct(t, p, args):
    """compressed_tensors' own unpack_from_int32 + dequantize (pack-quantized or int-quantized)."""
    s = t[p + ".weight_scale"]
    if p + ".weight_packed" in t:
        shape = torch.Size(t[p + ".weight_shape"].tolist())
        x = unpack_from_int32(t[p + ".weight_packed"], args.num_bits, shape)
        zp = None
        if p + ".weight_zero_point" in t:
            zp = unpack_from_int32(t[p + ".weight_zero_point"], args.num_bits, (shape[0], s.shape[1]), packed_dim=0)
    else:
        x, zp = t[p + ".weight"], None
    w = dequantize(x_q=x, scale=s, zero_point=zp, args=args)
    off = 1 << (args.num_bits - 1)
    z = (zp.long() + off) if zp is not None else torch.full(s.shape, off, dtype=torch.int64)
    return x.long() + off, z, s, w


def assert_same(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    assert torch.equal(a, b), f"{what}: differs (max {(a.double() - b.double()).abs().max().item()})"


def check_unpacked(got, qz, what):
    q, z, s, w = got
    assert_same(q, qz.q, what + " integers")
    assert_same(s, qz.s, what + " scales")
    assert_same(z, qz.z, what + " zeros")
    assert_same(w, qz.twin(), what + " dequantized")


# ---------------------------------------------------------------------------------------------
# Configs

def awq_config(group):
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}


def gptq_config(bits, sym, desc_act=False, v2=False):
    c = {"quant_method": "gptq", "bits": bits, "group_size": 32, "sym": sym, "desc_act": desc_act}
    if v2:
        c["checkpoint_format"] = "gptq_v2"
    return c


def ct_config(fmt, weights, input_activations=None, ignore=("lm_head",)):
    c = {"quant_method": "compressed-tensors", "format": fmt,
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                       "input_activations": input_activations, "output_activations": None}},
         "ignore": list(ignore), "quantization_status": "compressed"}
    QuantizationConfig.model_validate(c)  # compressed_tensors must accept it
    return c


W4_GROUP = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False}
W4_ASYM_GROUP = dict(W4_GROUP, symmetric=False)
W8_CHANNEL = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
A8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
FP8_CHANNEL = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "dynamic": False}


def qargs(weights):
    return QuantizationArgs(**{k: v for k, v in weights.items()})


# ---------------------------------------------------------------------------------------------
# Reference (transformers float32 on the dequantized twin)

def run_cases(model, act_quant=False):
    hooks = []
    if act_quant:
        def fake_quant(_mod, args):
            x = args[0]
            sc = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0
            return (torch.clamp(torch.round(x / sc), -128, 127) * sc,)
        for name, mod in model.named_modules():
            if any(name.endswith(l) for l in LINEARS):
                hooks.append(mod.register_forward_pre_hook(fake_quant))
    cases = []
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            logits = model(x).logits[0]
            out = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS,
                                 eos_token_id=None, pad_token_id=0)
            cases.append({"prompt": ids, "logits": [[round(v, 6) for v in row] for row in logits.tolist()],
                          "greedy": out[0, len(ids):].tolist()})
    for h in hooks:
        h.remove()
    return cases


class Reference:
    def __init__(self):
        self.model = tf.LlamaForCausalLM.from_pretrained(SRC, dtype=torch.float32).eval()
        self.orig = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.cache = {}

    def cases(self, key, twin, act_quant=False):
        """twin: {module prefix: dequantized weight}; key identifies the twin for reuse."""
        k = (key, act_quant)
        if k not in self.cache:
            sd = dict(self.orig)
            for p, w in twin.items():
                assert sd[p + ".weight"].shape == w.shape
                sd[p + ".weight"] = w
            self.model.load_state_dict(sd, strict=True)
            got = self.model.state_dict()
            for p, w in twin.items():
                assert torch.equal(got[p + ".weight"], w)
            self.cache[k] = run_cases(self.model, act_quant)
        return self.cache[k]


# ---------------------------------------------------------------------------------------------

def check_transformers_load(name, config):
    """Load a written compressed-tensors or FP8 fixture through transformers' own integration
    (decompressing to float32) and compare its logits with the reference."""
    qc = config["quantization_config"]
    d = os.path.join(OUT, name)
    if qc["quant_method"] == "compressed-tensors":
        kw = {"quantization_config": tf.CompressedTensorsConfig(dequantize=True)}
    elif qc["quant_method"] == "fp8":
        kw = {"quantization_config": tf.FineGrainedFP8Config(dequantize=True,
                                                             weight_block_size=tuple(qc["weight_block_size"]))}
    else:
        return "(independently unpacked)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw).eval()
    with open(os.path.join(d, "reference.json")) as f:
        cases = json.load(f)["cases"]
    diff = 0.0
    with torch.no_grad():
        for c in cases:
            logits = model(torch.tensor([c["prompt"]])).logits[0]
            diff = max(diff, (logits - torch.tensor(c["logits"])).abs().max().item())
    assert diff < 1e-5, f"{name}: transformers loads it with logits {diff} away"
    return f"(transformers loads it: max logit diff {diff:.1e})"


def write(name, config, tensors, ref=None, check=False):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "model.safetensors"),
              metadata={"format": "pt"})
    if ref is not None:
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump(ref, f)
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    assert size < 1_000_000, f"{name}: {size} bytes"
    h = hashlib.sha256(open(os.path.join(d, "model.safetensors"), "rb").read()).hexdigest()[:12]
    q = config["quantization_config"]
    print(f"{name}: {q['quant_method']}{' ' + q['format'] if 'format' in q else ''}, {len(tensors)} tensors,"
          f" {size} bytes, safetensors sha256 {h}"
          + (f", greedy {ref['cases'][0]['greedy']}" if ref else ", no reference (bad checkpoint)")
          + (" " + check_transformers_load(name, config) if check else ""))


def main():
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    only = set(sys.argv[1:])
    src = load_file(os.path.join(SRC, "model.safetensors"))
    with open(os.path.join(SRC, "config.json")) as f:
        base_cfg = json.load(f)
    n_layers = base_cfg["num_hidden_layers"]
    prefixes = [f"model.layers.{i}.{l}" for i in range(n_layers) for l in LINEARS]
    plain = {k: v for k, v in src.items() if not any(k == p + ".weight" for p in prefixes)}
    assert len(plain) + len(prefixes) == len(src)
    weights = {p: src[p + ".weight"] for p in prefixes}

    # One quantization per scheme, shared by every fixture that stores it.
    gen = torch.Generator().manual_seed(SEED)
    perms = {p: torch.randperm(weights[p].shape[1], generator=gen) for p in prefixes}
    Q = {
        "asym4_g32": {p: quantize_int(w, 4, 32, sym=False) for p, w in weights.items()},
        "asym4_gall": {p: quantize_int(w, 4, -1, sym=False) for p, w in weights.items()},
        "sym4_g32": {p: quantize_int(w, 4, 32, sym=True) for p, w in weights.items()},
        "asym4_g32_act": {p: quantize_int(w, 4, 32, sym=False, perm=perms[p]) for p, w in weights.items()},
        "sym8_g32": {p: quantize_int(w, 8, 32, sym=True) for p, w in weights.items()},
        "sym8_chan": {p: quantize_int(w, 8, -1, sym=True) for p, w in weights.items()},
    }
    for p, qz in Q["asym4_g32_act"].items():  # act order really permutes: groups are not contiguous
        assert not torch.equal(qz.g_idx, torch.arange(qz.g_idx.numel()) // 32), p
    fp8_chan = {p: quantize_fp8(w) for p, w in weights.items()}
    fp8_block = {p: quantize_fp8(w, (128, 128)) for p, w in weights.items()}
    fp8_small = {p: quantize_fp8(w, (16, 32)) for p, w in weights.items()}

    ref = Reference()
    meta = {"architecture": "LlamaForCausalLM", "transformers": tf.__version__, "torch": torch.__version__,
            "source": "fixtures/models/llama"}
    TWIN_INT = "dequantized integers x scales: each quantized weight is scale * (q - zero) in float32"
    TWIN_FP8 = "dequantized e4m3 x scales: each quantized weight is float(e4m3) * scale in float32"

    def cfg(qc):
        c = copy.deepcopy(base_cfg)
        c["quantization_config"] = qc
        return c

    def reference(qkey, twin, same=None, note=None, act_quant=False):
        r = dict(meta, twin=TWIN_FP8 if qkey.startswith("fp8") else TWIN_INT)
        if same:
            r["same_integers_as"] = same
        if note:
            r["note"] = note
        r["cases"] = ref.cases(qkey, twin)
        if act_quant:
            r["cases_dynamic_int8_activations"] = ref.cases(qkey, twin, act_quant=True)
        return r

    def build(prefix_fn, qmap):
        t = dict(plain)
        for p in prefixes:
            t.update(prefix_fn(p, qmap[p]))
        return t

    twins = {k: {p: qz.twin() for p, qz in m.items()} for k, m in Q.items()}
    SAME_ASYM = ["awq_g32", "gptq_g32_asym", "gptq_v2_g32", "ct_w4a16_asym_group"]
    SAME_SYM4 = ["gptq_g32_sym", "ct_w4a16_group"]
    SAME_SYM8 = ["ct_w8a16_channel", "ct_w8a8_int"]
    fixtures = {}

    # 1. AWQ
    for name, qkey, group in [("awq_g32", "asym4_g32", 32), ("awq_gneg1", "asym4_gall", -1)]:
        t = build(awq_tensors, Q[qkey])
        for p in prefixes:
            check_unpacked(unpack_awq(t, p, group), Q[qkey][p], f"{name} {p}")
        fixtures[name] = (cfg(awq_config(group)), t, qkey, SAME_ASYM if name == "awq_g32" else None)

    # 2-6. GPTQ
    for name, qkey, qc, v2 in [
        ("gptq_g32_asym", "asym4_g32", gptq_config(4, False), False),
        ("gptq_g32_sym", "sym4_g32", gptq_config(4, True), False),
        ("gptq_v2_g32", "asym4_g32", gptq_config(4, False, v2=True), True),
        ("gptq_desc_act", "asym4_g32_act", gptq_config(4, False, desc_act=True), False),
        ("gptq_8bit", "sym8_g32", gptq_config(8, True), False),
    ]:
        t = build(lambda p, qz: gptq_tensors(p, qz, v2), Q[qkey])
        for p in prefixes:
            check_unpacked(unpack_gptq(t, p, qc["bits"], v2), Q[qkey][p], f"{name} {p}")
        same = SAME_ASYM if qkey == "asym4_g32" else SAME_SYM4 if qkey == "sym4_g32" else None
        fixtures[name] = (cfg(qc), t, qkey, same)

    # 7-10. compressed-tensors integer formats
    for name, qkey, fmt, w, a, sym in [
        ("ct_w4a16_group", "sym4_g32", "pack-quantized", W4_GROUP, None, True),
        ("ct_w4a16_asym_group", "asym4_g32", "pack-quantized", W4_ASYM_GROUP, None, False),
        ("ct_w8a16_channel", "sym8_chan", "pack-quantized", W8_CHANNEL, None, True),
        ("ct_w8a8_int", "sym8_chan", "int-quantized", W8_CHANNEL, A8_TOKEN, True),
    ]:
        if fmt == "pack-quantized":
            t = build(lambda p, qz: ct_packed_tensors(p, qz, sym), Q[qkey])
        else:
            t = build(ct_int8_tensors, Q[qkey])
        args = qargs(w)
        for p in prefixes:
            check_unpacked(unpack_ct(t, p, args), Q[qkey][p], f"{name} {p}")
        same = SAME_ASYM if qkey == "asym4_g32" else SAME_SYM4 if qkey == "sym4_g32" else SAME_SYM8
        fixtures[name] = (cfg(ct_config(fmt, w, a)), t, qkey, same)

    # The shared fixtures really store the same integers, zeros and scales.
    for group in (SAME_ASYM, SAME_SYM4, SAME_SYM8):
        unpacked = {}
        for name in group:
            c, t, qkey, _ = fixtures[name]
            qc = c["quantization_config"]
            for p in prefixes:
                if qc["quant_method"] == "awq":
                    u = unpack_awq(t, p, qc["group_size"])
                elif qc["quant_method"] == "gptq":
                    u = unpack_gptq(t, p, qc["bits"], qc.get("checkpoint_format") == "gptq_v2")
                else:
                    u = unpack_ct(t, p, qargs(qc["config_groups"]["group_0"]["weights"]))
                unpacked.setdefault(p, []).append((name, u))
        for p, us in unpacked.items():
            for name, u in us[1:]:
                for a, b, what in zip(us[0][1], u, ("integers", "zeros", "scales", "weights")):
                    assert_same(b, a, f"{name} vs {us[0][0]} {p} {what}")

    # 11-12. FP8
    args = qargs(FP8_CHANNEL)
    t = dict(plain)
    for p in prefixes:
        v, s, twin = fp8_chan[p]
        t[p + ".weight"], t[p + ".weight_scale"] = v, s
    for p in prefixes:
        w = dequantize(x_q=t[p + ".weight"], scale=t[p + ".weight_scale"], args=args)
        assert_same(w, fp8_chan[p][2], f"ct_fp8_channel {p} compressed_tensors dequantize")
        assert_same(t[p + ".weight"].to(torch.float32) * t[p + ".weight_scale"], fp8_chan[p][2], p)
    fixtures["ct_fp8_channel"] = (cfg(ct_config("float-quantized", FP8_CHANNEL)), t, "fp8_chan", None)
    twins["fp8_chan"] = {p: x[2] for p, x in fp8_chan.items()}

    for name, fq, block in [("fp8_block", fp8_block, [128, 128]), ("fp8_block_16x32", fp8_small, [16, 32])]:
        t = dict(plain)
        for p in prefixes:
            v, s, twin = fq[p]
            t[p + ".weight"], t[p + ".weight_scale_inv"] = v, s
            # e4m3 round trip, then each [b0, b1] block times its stored scale
            back = t[p + ".weight"].to(torch.float32).clone()
            for r in range(s.shape[0]):
                for c in range(s.shape[1]):
                    back[r * block[0]:(r + 1) * block[0], c * block[1]:(c + 1) * block[1]] *= s[r, c]
            assert_same(back, twin, f"{name} {p}")
            assert_same(v.to(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8), v.view(torch.uint8), p)
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": block, "fmt": "e4m3"}
        fixtures[name] = (cfg(qc), t, "fp8_" + name, None)
        twins["fp8_" + name] = {p: x[2] for p, x in fq.items()}

    # Write the good fixtures with their references.
    notes = {
        "ct_w8a8_int": "cases: weights dequantized, activations float32; cases_dynamic_int8_activations: "
                       "each quantized linear's input also fake-quantized per token (int8, scale max|x|/127)",
        "fp8_block": "weight_block_size [128, 128]: every weight of this model is a single (partial) block",
        "fp8_block_16x32": "weight_block_size [16, 32] (not in the original brief): several blocks per weight",
        "awq_gneg1": "group_size -1: one group over all input channels (scales [1, out])",
        "gptq_desc_act": "act order: g_idx from a fixed random permutation per layer (seed %d)" % SEED,
    }
    for name, (c, t, qkey, same) in fixtures.items():
        if only and name not in only:
            continue
        r = reference(qkey, twins[qkey], same, notes.get(name), act_quant=(name == "ct_w8a8_int"))
        write(name, c, t, r, check=True)

    # Bad checkpoints (no reference.json).
    def bad(name, c, t):
        if not only or name in only:
            write(name, c, t)

    c7, t7 = fixtures["ct_w4a16_group"][:2]
    c = copy.deepcopy(c7)
    c["quantization_config"]["ignore"] = ["lm_head", "re:.*does_not_exist.*"]
    bad("ct_w4a16_ignore_mismatch", c, t7)
    c1, t1 = fixtures["awq_g32"][:2]
    victim = "model.layers.1.self_attn.v_proj"
    bad("bad_awq_missing_scales", c1, {k: v for k, v in t1.items() if k != victim + ".scales"})
    c = copy.deepcopy(fixtures["gptq_g32_asym"][0])
    c["quantization_config"]["bits"] = 3
    bad("bad_gptq_bits3", c, fixtures["gptq_g32_asym"][1])
    c = copy.deepcopy(base_cfg)
    c["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                "bnb_4bit_compute_dtype": "float32"}
    bad("bad_unknown_method", c, t1)
    cf, tf8 = fixtures["fp8_block"][:2]
    bad("bad_fp8_no_scale", cf, {k: v for k, v in tf8.items() if k != victim + ".weight_scale_inv"})
    c = copy.deepcopy(c1)
    c["quantization_config"]["group_size"] = 64
    bad("bad_awq_group_shape", c, t1)


if __name__ == "__main__":
    main()
