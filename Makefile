# Shortcuts; each target is one documented script.
.PHONY: test bench bench-quick bench-replication bench-backup bench-elastic bench-connections bench-idle chaos dev

test:          ## the whole test suite (what CI runs)
	bash scripts/test.sh

bench:         ## Warbler vs NATS JetStream and Mosquitto, idle memory, a 3-node cluster's connection scale and reconnect storm, micro benchmarks; writes docs/benchmarks.md
	bash benches/compare.sh

bench-quick:   ## the same at a small size (a few minutes), to try the harness
	USERS=200 DURATION=5 IDLE=2000 CLUSTER_DEVICES=3000 STORM=500 FANOUT=2000 IDLE_SECS=10 MICRO=0 OUT=$${OUT:-/tmp/warbler-bench-quick} bash benches/compare.sh

bench-replication: ## single node vs one-member cluster vs RF 3, idle cluster CPU, fan-out (about 4 min)
	bash benches/replication.sh

bench-backup:  ## backup of a loaded 3-node cluster under load, restore into a new one: sizes and MB/s (about 2 min)
	bash benches/backup.sh

bench-elastic: ## throughput during a scale-out, leaders and replicas after it, one partition's move, a node's drain (about 3 min)
	bash benches/elastic.sh

bench-connections: ## 50,000 idle devices on a 3-node cluster (held, memory, CPU), then a reconnect storm of 10,000 (about 4 min)
	bash benches/connections.sh

bench-idle:    ## memory per idle connection of one node, and where its heap goes (about 2 min)
	bash benches/idle_memory.sh && TLS=on bash benches/idle_memory.sh && bash benches/idle_heap.sh

chaos:         ## every chaos scenario 5 times plus four broken builds; writes docs/chaos.md (about 2 hours on 2 cores)
	bash scripts/chaos.sh

dev:           ## a local 3-node cluster
	cargo run --release -- dev --nodes 3
