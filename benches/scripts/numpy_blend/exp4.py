import pickle, sys, numpy as np
sys.path.insert(0, '/tmp/sim')
import gemma
P = pickle.load(open('/tmp/sim/pairs.pkl', 'rb'))
n=256
shares=[0.05,0.1,0.2,0.3,0.4,0.5]
rows=[]
for p in P:
    cs=[]
    for r in shares:
        e,S,dev=gemma.blend(p['B']['ids'],p['A'],gemma.topk(r, n)); cs.append(float(e@p['B']['emb']))
    reuse=float(p['A']['emb']@p['B']['emb'])
    rows.append((p['differing'],reuse,cs))
    print(p['differing'], round(reuse,4), [round(c,4) for c in cs], flush=True)
pickle.dump(rows,open('rows4.pkl','wb'))
