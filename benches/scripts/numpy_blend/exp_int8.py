"""int8 K/V (a scale per token and layer, symmetric) vs f16 in the blend forward."""
import pickle, sys, numpy as np, time
sys.path.insert(0, '/tmp/sim')
import gemma
P = pickle.load(open('/tmp/sim/pairs.pkl', 'rb'))
def q8(a):
    s = np.abs(a).max(-1, keepdims=True) / 127.0
    s = s.astype(np.float16).astype(np.float32); s[s == 0] = 1
    return (np.clip(np.round(a / s), -127, 127) * s).astype(np.float32)
for r in [float(x) for x in sys.argv[1:]]:
    t = time.time(); res = {}
    for mode in ['f16', 'int8']:
        cs = []
        for p in P:
            A = p['A']
            if mode == 'int8':
                A = dict(A); A['K'] = [q8(k) for k in A['K']]; A['V'] = [q8(v) for v in A['V']]
            e, S, _ = gemma.blend(p['B']['ids'], A, gemma.topk(r, len(p['B']['ids'])), f16store=True)
            cs.append(float(e @ p['B']['emb']))
        res[mode] = np.array(cs)
    a, b = res['f16'], res['int8']
    print(f"r={r:.2f} f16 mean {a.mean():.5f} min {a.min():.5f} | int8 mean {b.mean():.5f} min {b.min():.5f} | per-pair |diff| max {np.abs(a-b).max():.5f} mean {np.abs(a-b).mean():.6f} ({time.time()-t:.0f}s)", flush=True)
