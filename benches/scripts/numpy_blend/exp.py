import pickle, sys, numpy as np, time
sys.path.insert(0, '/tmp/sim')
import gemma
P = pickle.load(open('/tmp/sim/pairs.pkl', 'rb'))
n = len(P[0]['A']['ids'])
def topk(r, key='dev'):
    def ch(dev, diff, ctx):
        s = set(diff)
        score = dev if key == 'dev' else np.linalg.norm(ctx['x'] - ctx['hA'], axis=1)
        for j in np.argsort(-score):
            if len(s) >= int(np.ceil(r * n)): break
            s.add(int(j))
        return s
    return ch
def oracle(r, B, A):
    fd = np.linalg.norm(B['H'][-1] - A['H'][-1], axis=1) / np.linalg.norm(A['H'][-1], axis=1)
    def ch(dev, diff, ctx):
        s = set(diff)
        for j in np.argsort(-fd):
            if len(s) >= int(np.ceil(r * n)): break
            s.add(int(j))
        return s
    return ch
def rnd(r):
    def ch(dev, diff, ctx):
        s = set(diff); rng = np.random.default_rng(0)
        for j in rng.permutation(n):
            if len(s) >= int(np.ceil(r * n)): break
            s.add(int(j))
        return s
    return ch
configs = sys.argv[1:]
for cfgname in configs:
    name, r = cfgname.split(':'); r = float(r)
    cs = []
    t = time.time()
    for p in P:
        A, B = p['A'], p['B']
        kw = {}
        if name == 'top': ch = gemma.topk(r, n)
        elif name == 'abs': ch = topk(r, 'abs')
        elif name == 'topc': ch = gemma.topk(r, n); kw = {'correct': 'residual'}
        elif name == 'oracle': ch = oracle(r, B, A)
        elif name == 'rnd': ch = rnd(r)
        emb, S, dev = gemma.blend(B['ids'], A, ch, **kw)
        cs.append(float(emb @ B['emb']))
    cs = np.array(cs)
    reuse = float(A['emb'] @ B['emb'])
    print(f"{cfgname:12s} mean {cs.mean():.5f} min {cs.min():.5f} p10 {np.quantile(cs,0.1):.5f}  ({time.time()-t:.0f}s)", flush=True)
