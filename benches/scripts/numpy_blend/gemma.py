"""Independent NumPy EmbeddingGemma forward + blend simulator (scratch, not shipped)."""
import json, os, struct
import numpy as np

M = os.path.expanduser("~/.cache/attncache/models/embeddinggemma-300m")


def load_st(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        assert v["dtype"] == "F32"
        out[k] = np.frombuffer(mm[a:b], dtype=np.float32).reshape(v["shape"])
    return out


cfg = json.load(open(f"{M}/config.json"))
W = load_st(f"{M}/model.safetensors")
D2 = load_st(f"{M}/2_Dense/model.safetensors")
D3 = load_st(f"{M}/3_Dense/model.safetensors")
H, NH, HD, NL = 768, 3, 256, 24
WIN = cfg["sliding_window"] // 2 + 1
EPS = 1e-6
LT = cfg["layer_types"]
L = [{k.split(f"layers.{i}.")[1]: v for k, v in W.items() if k.startswith(f"layers.{i}.")} for i in range(NL)]
for l in L:
    for k in list(l):
        if k.endswith("proj.weight"):
            l[k] = np.ascontiguousarray(l[k].T)


def rms(x, w):
    x64 = x.astype(np.float32)
    return x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + EPS) * (1.0 + w)


def rope_tables(base, n):
    inv = 1.0 / base ** (np.arange(0, HD, 2, dtype=np.float64) / HD)
    t = np.arange(n)[:, None] * inv[None, :]
    emb = np.concatenate([t, t], -1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


ROPE = {"local": rope_tables(cfg["rope_local_base_freq"], 4096), "global": rope_tables(cfg["rope_theta"], 4096)}


def rope(x, pos, kind):
    # x [heads, n, HD]
    c, s = ROPE[kind]
    c, s = c[pos][None], s[pos][None]
    x1, x2 = x[..., : HD // 2], x[..., HD // 2 :]
    rot = np.concatenate([-x2, x1], -1)
    return x * c + rot * s


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def qkv(l, xn):
    n = xn.shape[0]
    q = (xn @ l["self_attn.q_proj.weight"]).reshape(n, NH, HD).transpose(1, 0, 2)
    k = (xn @ l["self_attn.k_proj.weight"]).reshape(n, 1, HD).transpose(1, 0, 2)
    v = (xn @ l["self_attn.v_proj.weight"]).reshape(n, 1, HD).transpose(1, 0, 2)
    q = rms(q, l["self_attn.q_norm.weight"])
    k = rms(k, l["self_attn.k_norm.weight"])
    return q, k, v


def attn(l, i, q, qpos, k, v, kpos_n):
    kind = "local" if LT[i] == "sliding_attention" else "global"
    qr = rope(q, qpos, kind)
    kr = rope(k, np.arange(kpos_n), kind)
    s = (qr @ kr.transpose(0, 2, 1)) * cfg["query_pre_attn_scalar"] ** -0.5  # [3, nq, L]
    if kind == "local":
        d = np.abs(qpos[:, None] - np.arange(kpos_n)[None, :])
        s = np.where(d[None] < WIN, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    o = p @ v  # [3, nq, HD]
    o = o.transpose(1, 0, 2).reshape(len(qpos), NH * HD)
    return o @ l["self_attn.o_proj.weight"]


def mlp_part(l, x):
    h = rms(x, l["pre_feedforward_layernorm.weight"])
    h = gelu_tanh(h @ l["mlp.gate_proj.weight"]) * (h @ l["mlp.up_proj.weight"])
    h = h @ l["mlp.down_proj.weight"]
    return x + rms(h, l["post_feedforward_layernorm.weight"])


def embed_in(ids):
    return W["embed_tokens.weight"][np.asarray(ids)] * np.float32(np.sqrt(H))


def pool(final):
    x = rms(final, W["norm.weight"]).mean(0)
    x = x @ D2["linear.weight"].T
    x = x @ D3["linear.weight"].T
    return x / np.linalg.norm(x)


def forward(ids):
    """Exact forward; returns dict with per-layer K (pre-rope), V, hidden after each layer."""
    x = embed_in(ids)
    n = len(ids)
    pos = np.arange(n)
    K, V, Hs = [], [], []
    for i, l in enumerate(L):
        xn = rms(x, l["input_layernorm.weight"])
        q, k, v = qkv(l, xn)
        K.append(k[0].copy()); V.append(v[0].copy())
        a = attn(l, i, q, pos, k, v, n)
        x = x + rms(a, l["post_attention_layernorm.weight"])
        x = mlp_part(l, x)
        Hs.append(x.copy())
    return {"ids": list(ids), "K": K, "V": V, "H": Hs, "emb": pool(x)}


def f16(a):
    return a.astype(np.float16).astype(np.float32)


def blend(ids, A, choose, check=0, f16store=True, correct=None):
    """Blend forward of `ids` over stored A (same length, aligned by position).
    choose(dev, differing, ctx) -> sorted positions S. Returns (emb, S, ctx)."""
    n = len(ids)
    pos = np.arange(n)
    x = embed_in(ids)
    for i in range(check + 1):
        l = L[i]
        xn = rms(x, l["input_layernorm.weight"])
        q, k, v = qkv(l, xn)
        a = attn(l, i, q, pos, k, v, n)
        x = x + rms(a, l["post_attention_layernorm.weight"])
        x = mlp_part(l, x)
    hA = A["H"][check]
    dev = np.linalg.norm(x - hA, axis=1) / np.linalg.norm(hA, axis=1)
    differing = [j for j in range(n) if ids[j] != A["ids"][j]]
    S = np.array(sorted(choose(dev, differing, {"x": x, "hA": hA})), dtype=int)
    xs = x[S]
    for i in range(check + 1, NL):
        l = L[i]
        xn = rms(xs, l["input_layernorm.weight"])
        q, k, v = qkv(l, xn)
        Kf = f16(A["K"][i]) if f16store else A["K"][i].copy()
        Vf = f16(A["V"][i]) if f16store else A["V"][i].copy()
        Kf = Kf.copy(); Vf = Vf.copy()
        Kf[S] = k[0]; Vf[S] = v[0]
        a = attn(l, i, q, S, Kf[None], Vf[None], n)
        xs = xs + rms(a, l["post_attention_layernorm.weight"])
        xs = mlp_part(l, xs)
    fin = A["H"][-1].copy()
    if correct == "residual":
        fin = fin + (x - hA)
    fin[S] = xs
    return pool(fin), S, dev


def blend2(ids, A, S, full_from=None, check=0, B=None, ideal=False):
    """S-only layers check+1..full_from-1, then every position from layer full_from on, with
    the non-S states taken from A's hidden states after layer full_from-1. ideal: S rows get B's
    exact states (no stale K/V error) -- selection-only error."""
    n = len(ids); pos = np.arange(n)
    if ideal:
        fin = A["H"][-1].copy(); fin[S] = B["H"][-1][S]; return pool(fin)
    x = embed_in(ids)
    for i in range(check + 1):
        l = L[i]
        xn = rms(x, l["input_layernorm.weight"]); q, k, v = qkv(l, xn)
        x = x + rms(attn(l, i, q, pos, k, v, n), l["post_attention_layernorm.weight"]); x = mlp_part(l, x)
    xs = x[S]
    end = NL if full_from is None else full_from
    for i in range(check + 1, end):
        l = L[i]
        xn = rms(xs, l["input_layernorm.weight"]); q, k, v = qkv(l, xn)
        Kf = f16(A["K"][i]).copy(); Vf = f16(A["V"][i]).copy(); Kf[S] = k[0]; Vf[S] = v[0]
        xs = xs + rms(attn(l, i, q, S, Kf[None], Vf[None], n), l["post_attention_layernorm.weight"]); xs = mlp_part(l, xs)
    if full_from is None:
        fin = A["H"][-1].copy(); fin[S] = xs; return pool(fin)
    x = A["H"][full_from - 1].copy(); x[S] = xs
    for i in range(full_from, NL):
        l = L[i]
        xn = rms(x, l["input_layernorm.weight"]); q, k, v = qkv(l, xn)
        x = x + rms(attn(l, i, q, pos, k, v, n), l["post_attention_layernorm.weight"]); x = mlp_part(l, x)
    return pool(x)


def topk(r, n):
    """Chooser for `blend`: the differing positions plus the largest layer-0 deviations up
    to a share r of n positions."""
    def ch(dev, diff, ctx):
        s = set(diff)
        for j in np.argsort(-dev):
            if len(s) >= int(np.ceil(r * n)):
                break
            s.add(int(j))
        return s
    return ch
