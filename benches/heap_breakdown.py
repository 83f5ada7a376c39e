"""Where an idle connection's heap goes, from heaptrack's peak stacks.

    python3 benches/heap_breakdown.py CONNECTIONS BEFORE.stacks AFTER.stacks

The stacks files come from `heaptrack_print --flamegraph-cost-type peak -F FILE` (see
benches/idle_heap.sh). Each allocation alive at the peak is put in the first category whose
test its stack passes; the table is bytes per connection.
"""
import re
import sys

N = int(sys.argv[1])
cats=[
 ('connection task (its future)', lambda s: 'new_task' in s and '(tcp.rs)' in s and '{async_fn#0}<> (tcp.rs)' not in s and 'actor.rs' not in s),
 ('writer task (its future)', lambda s: 'new_task' in s and re.search(r'\{async_fn#0\}<> \(tcp\.rs\)', s) and 'actor.rs' not in s),
 ('mailbox idle timers (tasks)', lambda s: 'new_task' in s and 'send_after' in s),
 ('actor tasks (session, mailbox)', lambda s: 'new_task' in s and 'actor.rs' in s),
 ('other tasks', lambda s: 'new_task' in s),
 ('actor cells, channels, supervision', lambda s: re.search(r'ractor|actor_properties|actor_cell|supervision', s) and 'rocksdb' not in s),
 ('mailbox registry: sleeping subscribers, mailbox refs', lambda s: re.search(r'registry\.rs', s)),
 ('actor processing loops (boxed)', lambda s: '{async_block#0}<> (actor.rs)' in s),
 ('TLS session (rustls)', lambda s: 'rustls' in s),
 ('outgoing queue (Outbox / mpsc)', lambda s: re.search(r'outbox\.rs|chan\.rs|block\.rs|list\.rs', s)),
 ('read buffer', lambda s: re.search(r'framed_read|bytes_mut', s)),
 ('socket registration (tokio I/O driver)', lambda s: re.search(r'registration|driver\.rs', s)),
 ('mailbox state', lambda s: re.search(r'mailbox\.rs', s)),
 ('session and connection state', lambda s: re.search(r'conn\.rs|session\.rs|auth\.rs', s)),
 ('storage (RocksDB)', lambda s: re.search(r'rocksdb', s)),
]
def classify(path):
    tot={}
    for line in open(path):
        stack, cost = line.rstrip('\n').rsplit(' ',1)
        cost=int(cost)
        if cost<=0: continue
        name='other'
        for n,f in cats:
            if f(stack): name=n; break
        tot[name]=tot.get(name,0)+cost
    return tot
a = classify(sys.argv[2])
b = classify(sys.argv[3])
names=[n for n,_ in cats]+['other']
print("| where | before (bytes per connection) | after |")
print("|---|---|---|")
for n in names:
    x,y=a.get(n,0)/N,b.get(n,0)/N
    if x<20 and y<20: continue
    print(f"| {n} | {x:,.0f} | {y:,.0f} |")
print(f"| **heap in all** | **{sum(a.values())/N:,.0f}** | **{sum(b.values())/N:,.0f}** |")
