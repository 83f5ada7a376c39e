# Sourced by the benchmark scripts. The leaders spread over the nodes in the seconds after
# formation: `leaders_spread HTTP_ADDR TOKEN` returns once every node of a 3-node cluster
# leads 16 to 27 of the 64 partitions (within 25% of even) and the routes held for half a
# second (at most 30 s), so that routes read at the start of a run stay right. TOKEN has
# the publish scope (GET /v1/routes).
leaders_spread() {
    local addr=$1 token=$2 last="" now i
    for i in $(seq 60); do
        now=$(curl -sf -H "Authorization: Bearer $token" "http://$addr/v1/routes" |
            python3 -c 'import collections, json, sys
leaders = json.load(sys.stdin)["leaders"]
counts = collections.Counter(leaders)
even = len(leaders) == 64 and None not in counts and len(counts) == 3 and all(16 <= c <= 27 for c in counts.values())
print(json.dumps(leaders) if even else "")' 2>/dev/null || true)
        if [ -n "$now" ] && [ "$now" = "$last" ]; then return 0; fi
        last=$now
        sleep 0.5
    done
    echo "the leaders did not spread within 30 s; measuring anyway" >&2
}
