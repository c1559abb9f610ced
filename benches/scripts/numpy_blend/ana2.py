import pickle, sys, numpy as np, os
sys.path.insert(0, '/tmp/sim')
import gemma
from tokenizers import Tokenizer
tok = Tokenizer.from_file(os.path.expanduser('~/.cache/attncache/models/embeddinggemma-300m/tokenizer.json'))
P = pickle.load(open('/tmp/sim/pairs.pkl', 'rb'))
nw = gemma.W["norm.weight"]
p=P[0];A,B=p['A'],p['B']
zA=gemma.rms(A['H'][-1],nw); zB=gemma.rms(B['H'][-1],nw)
e=np.linalg.norm(zB-zA,axis=1)/np.linalg.norm(zA,axis=1).mean()
for j in np.argsort(-e)[:30]:
    print(j, round(float(e[j]),2), repr(tok.id_to_token(A['ids'][j])), repr(tok.id_to_token(B['ids'][j])))
# oracle by post-norm error
n=256
def head(z):
    x = z.mean(0) @ gemma.D2["linear.weight"].T @ gemma.D3["linear.weight"].T
    return x / np.linalg.norm(x)
for r in (0.05,0.1,0.2):
    cs=[]
    for p in P:
        A,B=p['A'],p['B']
        zA=gemma.rms(A['H'][-1],nw); zB=gemma.rms(B['H'][-1],nw)
        e=np.linalg.norm(zB-zA,axis=1)
        S=np.argsort(-e)[:int(r*n)]
        z=zA.copy(); z[S]=zB[S]; cs.append(float(head(z)@B['emb']))
    print('oracle post-norm', r, np.mean(cs), np.min(cs))
