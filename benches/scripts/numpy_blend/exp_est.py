"""Pooled-mean estimator: S = differing + top layer-0 deviation (share r0) computed exactly by
blend; R = a stratified sample (share m) of the remaining positions, also recomputed; the
positions in neither get A's final state plus the mean deviation measured on R (post final norm)."""
import pickle, sys, numpy as np, time
sys.path.insert(0, '/tmp/sim')
import gemma
from gemma import L, NL, rms, qkv, attn, mlp_part, embed_in, f16, W
P = pickle.load(open('/tmp/sim/pairs.pkl', 'rb'))

def blend_rows(ids, A, S, check=0):
    n = len(ids); pos = np.arange(n); x = embed_in(ids)
    for i in range(check + 1):
        l = L[i]; xn = rms(x, l["input_layernorm.weight"]); q, k, v = qkv(l, xn)
        x = x + rms(attn(l, i, q, pos, k, v, n), l["post_attention_layernorm.weight"]); x = mlp_part(l, x)
    xs = x[S]
    for i in range(check + 1, NL):
        l = L[i]; xn = rms(xs, l["input_layernorm.weight"]); q, k, v = qkv(l, xn)
        Kf = f16(A["K"][i]).copy(); Vf = f16(A["V"][i]).copy(); Kf[S] = k[0]; Vf[S] = v[0]
        xs = xs + rms(attn(l, i, q, S, Kf[None], Vf[None], n), l["post_attention_layernorm.weight"]); xs = mlp_part(l, xs)
    return x, xs

def head(pooled):
    x = pooled @ gemma.D2["linear.weight"].T; x = x @ gemma.D3["linear.weight"].T
    return x / np.linalg.norm(x)

def layer0(ids):
    n = len(ids); pos = np.arange(n); x = embed_in(ids); l = L[0]
    xn = rms(x, l["input_layernorm.weight"]); q, k, v = qkv(l, xn)
    x = x + rms(attn(l, 0, q, pos, k, v, n), l["post_attention_layernorm.weight"]); return mlp_part(l, x)

def run(r0, m, mode):
    cs_plain, cs_est = [], []
    for p in P:
        A, B = p['A'], p['B']; ids = B['ids']; n = len(ids)
        x0 = layer0(ids); hA = A['H'][0]
        dev = np.linalg.norm(x0 - hA, axis=1) / np.linalg.norm(hA, axis=1)
        det = set(j for j in range(n) if ids[j] != A['ids'][j])
        for j in np.argsort(-dev):
            if len(det) >= int(np.ceil(r0 * n)): break
            det.add(int(j))
        rest = np.array([j for j in range(n) if j not in det])
        k = int(np.ceil(m * n))
        if k > 0 and len(rest):
            if mode == 'stride':
                idx = ((np.arange(k) + 0.5) * len(rest) / k).astype(int)
                R = set(int(rest[i]) for i in idx)
            else:
                R = set(int(j) for j in np.random.default_rng(0).choice(rest, size=min(k, len(rest)), replace=False))
        else:
            R = set()
        S = np.array(sorted(det | R), dtype=int)
        _, xs = blend_rows(ids, A, S)
        finA = rms(A['H'][-1], W['norm.weight'])
        fin = finA.copy(); fin[S] = rms(xs, W['norm.weight'])
        cs_plain.append(float(head(fin.mean(0)) @ B['emb']))
        if R:
            Rl = np.array(sorted(R)); d = (fin[Rl] - finA[Rl]).mean(0)
            others = np.array([j for j in range(n) if j not in set(S.tolist())], dtype=int)
            fe = fin.copy(); fe[others] += d
            cs_est.append(float(head(fe.mean(0)) @ B['emb']))
    a = np.array(cs_plain); b = np.array(cs_est) if cs_est else a
    sh = r0 + m
    print(f"r0={r0:.2f} m={m:.2f} {mode:6s} share~{sh:.2f}  plain mean {a.mean():.5f} min {a.min():.5f} | est mean {b.mean():.5f} min {b.min():.5f} p10 {np.quantile(b,0.1):.5f}", flush=True)

for spec in sys.argv[1:]:
    r0, m, mode = spec.split(':'); t = time.time()
    run(float(r0), float(m), mode); print(f"  ({time.time()-t:.0f}s)", flush=True)
