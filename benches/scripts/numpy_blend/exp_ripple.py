"""Ripple correction: blend (S recomputed in layers 1..23) + a first-order correction of the
stale positions: at every layer, the change of a stale position's attention output caused by
the fresh K/V rows of S (stale q from A), through o_proj and the post-attention norm, added to
its residual stream (direct path only; MLP and later layers not re-run for stale rows)."""
import pickle, sys, numpy as np, time
sys.path.insert(0, '/tmp/sim')
import gemma
from gemma import L, NL, LT, rms, qkv, mlp_part, embed_in, f16, W, rope, cfg, WIN, NH, HD
P = pickle.load(open('/tmp/sim/pairs.pkl', 'rb'))

def probs(i, q, qpos, K, n):
    kind = "local" if LT[i] == "sliding_attention" else "global"
    qr = rope(q, qpos, kind); kr = rope(K, np.arange(n), kind)
    s = (qr @ kr.transpose(0, 2, 1)) * cfg["query_pre_attn_scalar"] ** -0.5
    if kind == "local":
        d = np.abs(qpos[:, None] - np.arange(n)[None, :]); s = np.where(d[None] < WIN, s, -np.inf)
    s = s - s.max(-1, keepdims=True); p = np.exp(s); p /= p.sum(-1, keepdims=True); return p

def attn_out(l, p, V, nq):
    o = (p @ V).transpose(1, 0, 2).reshape(nq, NH * HD); return o @ l["self_attn.o_proj.weight"]

def run(r, mode, from_layer):
    cs_plain, cs_rip = [], []
    for pr in P:
        A, B = pr['A'], pr['B']; ids = B['ids']; n = len(ids); pos = np.arange(n)
        x = embed_in(ids); l = L[0]
        xn = rms(x, l["input_layernorm.weight"]); q, k, v = qkv(l, xn)
        p = probs(0, q, pos, k, n)
        x = x + rms(attn_out(l, p, v, n), l["post_attention_layernorm.weight"]); x = mlp_part(l, x)
        hA = A['H'][0]
        dev = np.linalg.norm(x - hA, axis=1) / np.linalg.norm(hA, axis=1)
        s = set(j for j in range(n) if ids[j] != A['ids'][j])
        for j in np.argsort(-dev):
            if len(s) >= int(np.ceil(r * n)): break
            s.add(int(j))
        S = np.array(sorted(s)); T = np.array([j for j in range(n) if j not in s])
        xs = x[S]; delta = np.zeros((len(T), x.shape[1]), np.float32)
        for i in range(1, NL):
            l = L[i]
            xn = rms(xs, l["input_layernorm.weight"]); q, k, v = qkv(l, xn)
            KA = f16(A["K"][i]); VA = f16(A["V"][i]); Kf = KA.copy(); Vf = VA.copy(); Kf[S] = k[0]; Vf[S] = v[0]
            pS = probs(i, q, S, Kf[None], n)
            xs = xs + rms(attn_out(l, pS, Vf[None], len(S)), l["post_attention_layernorm.weight"]); xs = mlp_part(l, xs)
            if i >= from_layer and mode != 'none':
                xT = A['H'][i - 1][T] + (delta if mode == 'prop' else 0)
                qT, _, _ = qkv(l, rms(xT, l["input_layernorm.weight"]))
                pA = probs(i, qT, T, KA[None], n); pB = probs(i, qT, T, Kf[None], n)
                yA = attn_out(l, pA, VA[None], len(T)); yB = attn_out(l, pB, Vf[None], len(T))
                w = l["post_attention_layernorm.weight"]
                if mode == 'lin':
                    r_ = np.sqrt((yA * yA).mean(-1, keepdims=True) + 1e-6)
                    delta = delta + (yB - yA) / r_ * (1 + w)
                else:
                    delta = delta + rms(yB, w) - rms(yA, w)
        fin = A['H'][-1].copy(); fin[S] = xs
        cs_plain.append(float(gemma.pool(fin) @ B['emb']))
        fin2 = fin.copy(); fin2[T] += delta
        cs_rip.append(float(gemma.pool(fin2) @ B['emb']))
    a = np.array(cs_plain); b = np.array(cs_rip)
    print("plain", np.round(np.sort(a),4).tolist()); print("ripple", np.round(np.sort(b),4).tolist())
    print(f"r={r:.2f} {mode:5s} from={from_layer:2d}  plain mean {a.mean():.5f} min {a.min():.5f} | ripple mean {b.mean():.5f} min {b.min():.5f} p10 {np.quantile(b,0.1):.5f} better {np.mean(b>a):.2f}", flush=True)

for spec in sys.argv[1:]:
    r, mode, fl = spec.split(':'); t = time.time()
    run(float(r), mode, int(fl)); print(f"  ({time.time()-t:.0f}s)", flush=True)
