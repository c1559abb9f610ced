import json, os, re, glob, pickle, sys, time
import numpy as np
from tokenizers import Tokenizer
sys.path.insert(0, '/tmp/sim')
tok = Tokenizer.from_file(os.path.expanduser('~/.cache/attncache/models/embeddinggemma-300m/tokenizer.json'))
def email_text(raw):
    raw = raw.replace('\r\n', '\n')
    head, _, body = raw.partition('\n\n')
    subj = ''
    for line in head.split('\n'):
        if line.lower().startswith('subject:'): subj = line[8:].strip()
    if 'quoted-printable' in raw.lower():
        body = body.replace('=\n', '')
        body = re.sub(r'=([0-9A-Fa-f]{2})', lambda m: chr(int(m.group(1), 16)), body)
    kept = [l for l in body.split('\n') if not (l.strip().startswith('--') or l.strip().lower().startswith('content-') or l.strip().lower().startswith('mime-version') or (len(l.strip()) >= 60 and ' ' not in l.strip()))]
    text = re.sub(r'<[^>]*>', ' ', '\n'.join(kept))
    return f"Subject: {subj}\n" + ' '.join(text.split())
N = 256
emails = []
for f in sorted(glob.glob(os.path.expanduser('~/.cache/attncache/data/spam-assassin/*/*.json'))):
    r = json.load(open(f))
    ids = tok.encode(f"title: none | text: {email_text(r['text'])}").ids
    if len(ids) >= N: emails.append((r['group'], ids[:N]))
print(len(emails), 'emails >=', N)
from collections import defaultdict
post = defaultdict(list)
for i, (_, ids) in enumerate(emails):
    for s in set(tuple(ids[j:j+4]) for j in range(N-3)): post[s].append(i)
shared = defaultdict(int)
for l in post.values():
    if 1 < len(l) <= 40:
        for a in range(len(l)):
            for b in l[a+1:]: shared[(l[a], b)] += 1
cands = sorted([p for p, n in shared.items() if n >= N/2], key=lambda p: -shared[p])
used = set(); pairs = []
for i, j in cands:
    if i in used or j in used: continue
    a, b = emails[i][1], emails[j][1]
    if a == b: continue
    d = sum(x != y for x, y in zip(a, b))
    if d <= 0.1 * N:
        used |= {i, j}; pairs.append((i, j, d))
print(len(pairs), 'pairs; differing', [p[2] for p in pairs])
import gemma
out = []
t0 = time.time()
for k, (i, j, d) in enumerate(pairs[:40]):
    A = gemma.forward(emails[i][1]); B = gemma.forward(emails[j][1])
    out.append({'A': A, 'B': B, 'label': emails[i][0], 'differing': d})
    print(f'{k+1}/{min(40,len(pairs))} {time.time()-t0:.0f}s', flush=True)
    pickle.dump(out, open('/tmp/sim/pairs.pkl', 'wb'))
