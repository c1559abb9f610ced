import pickle, sys, numpy as np, time
sys.path.insert(0, '/tmp/sim')
import gemma
P = pickle.load(open('/tmp/sim/pairs.pkl', 'rb'))
n = len(P[0]['A']['ids'])
def S_top(p, r):
    A, B = p['A'], p['B']
    x = gemma.embed_in(B['ids'])  # recompute layer 0 cheaply via stored exact B H[0]
    dev = np.linalg.norm(B['H'][0] - A['H'][0], axis=1) / np.linalg.norm(A['H'][0], axis=1)
    s = set(j for j in range(n) if B['ids'][j] != A['ids'][j])
    for j in np.argsort(-dev):
        if len(s) >= int(np.ceil(r * n)): break
        s.add(int(j))
    return np.array(sorted(s))
for c in sys.argv[1:]:
    kind, r, ff = c.split(':'); r = float(r); ff = int(ff) if ff else None
    t = time.time(); cs = []
    for p in P:
        S = S_top(p, r)
        e = gemma.blend2(p['B']['ids'], p['A'], S, full_from=ff, B=p['B'], ideal=(kind == 'ideal'))
        cs.append(float(e @ p['B']['emb']))
    cs = np.array(cs)
    print(f"{c:14s} mean {cs.mean():.5f} min {cs.min():.5f} p10 {np.quantile(cs,0.1):.5f} ({time.time()-t:.0f}s)", flush=True)
