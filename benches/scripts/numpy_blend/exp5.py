import pickle, sys, numpy as np
sys.path.insert(0, '/tmp/sim')
import gemma
P = pickle.load(open('/tmp/sim/pairs.pkl', 'rb'))
n=256; nw=gemma.W['norm.weight']
out=[]
for p in P:
    A,B=p['A'],p['B']
    z0A=gemma.rms(A['H'][0],nw).mean(0); z0B=gemma.rms(B['H'][0],nw).mean(0)
    pooled0=1-float(z0A@z0B/np.linalg.norm(z0A)/np.linalg.norm(z0B))
    for r in (0.05,0.1,0.2):
        e,S,dev=gemma.blend(B['ids'],A,gemma.topk(r, n))
        out.append((r,p['differing'],pooled0,1-float(e@A['emb']),1-float(e@B['emb'])))
pickle.dump(out,open('rows5.pkl','wb'))
for r in (0.05,0.1,0.2):
    o=np.array([x[1:] for x in out if x[0]==r])
    rk=lambda a: np.argsort(np.argsort(a))
    print(r,'spearman err vs: differing',np.corrcoef(rk(o[:,0]),rk(o[:,3]))[0,1],'pooled0',np.corrcoef(rk(o[:,1]),rk(o[:,3]))[0,1],'moved',np.corrcoef(rk(o[:,2]),rk(o[:,3]))[0,1])
    for thr in (0.002,0.005,0.01,0.02,0.04):
        acc=o[o[:,2]<=thr]
        if len(acc): print('   moved<=',thr,'accept',len(acc),'/',len(o),'fid mean',1-acc[:,3].mean(),'min',1-acc[:,3].max())
