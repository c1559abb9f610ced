import json, time, numpy as np, sys
sys.path.insert(0, '/tmp/sim')
import gemma
d = json.load(open('/work/main/benches/reference/embeddinggemma.json'))
for it in d['inputs']:
    if it['tokens'] not in (16, 297, 585): continue
    t = time.time()
    r = gemma.forward(it['token_ids'])
    ref = np.array(it['embedding'], dtype=np.float64)
    print(it['name'], it['tokens'], float(r['emb'] @ ref / np.linalg.norm(ref)), f"{time.time()-t:.2f}s")
