package main

import (
	"fmt"

	"github.com/pagedkv/pagedkv/internal/workload/eventbench"
	"github.com/pagedkv/pagedkv/kvevents"
	"github.com/pagedkv/pagedkv/vmm"
)

// benchEvents measures the KV-event publisher (kvevents) on the host backend, whatever the
// device: what it costs the decode step against the same step without it, the block events per
// second it sends, and the latency from the append that caches a block to a subscriber's
// receipt of it.
func benchEvents(_ vmm.Device, iters int) ([]Table, error) {
	// 21 rounds: at 7 the control row of one H200 host ranged 0.92-1.04 over a session, at 40
	// about 0.94-1.02 (docs/performance.md).
	rounds, batches, samples := 21, 400, 2000
	if iters == 0 {
		rounds, batches, samples = 1, 20, 100
	}
	over := Table{
		Title: "KV events: the decode step with a publisher attached",
		Note: "kvbench.Decode's step (AppendTokenIDs of one id, 256 sequences, 1,024 live, 0% hits: every filled block cached and later evicted, each an event) " +
			fmt.Sprintf("on fresh managers without and with a publisher, in turn, %d rounds of a warm-up and a timed cycle of 262,144 steps each. Goal: at most 1.05x. ", rounds) +
			"Absent: nobody connected; stalled: a subscriber that never reads; deferred: batches sent only between 4,096-step chunks, untimed (the appending goroutine's share alone); " +
			"none (control): no publisher on either side, the same method comparing a thing with itself, so its ratio shows how far apart two measurements fall on this machine.",
		Columns: []string{"subscriber", "ns/token without", "ns/token with", "with / without", "median round", "goal", "allocs/token without", "allocs/token with"},
	}
	for _, sub := range []eventbench.Subscriber{eventbench.Control, eventbench.Absent, eventbench.Stalled, eventbench.Deferred} {
		o, err := eventbench.MeasureOverhead(sub, rounds)
		if err != nil {
			return nil, fmt.Errorf("%s subscriber: %w", sub, err)
		}
		over.Rows = append(over.Rows, []string{string(sub), fmt.Sprintf("%.1f", o.NsNone), fmt.Sprintf("%.1f", o.NsWith),
			fmt.Sprintf("%.3fx", o.Ratio), fmt.Sprintf("%.3fx", o.RatioMedian), overheadGoal(sub, o.Ratio),
			fmt.Sprintf("%.4f", o.AllocsNone), fmt.Sprintf("%.4f", o.AllocsWith)})
	}
	rate, err := eventbench.Throughput(batches)
	if err != nil {
		return nil, err
	}
	wire := Table{
		Title:   "KV events on the wire: throughput and latency",
		Note:    "Throughput: batches of 1,024 one-block BlockStored events through a publisher to a ZMQ subscriber in the same process, all on one core (goal: 1 million a second). Latency: from the AppendTokenIDs that caches a block to the subscriber's receipt of its batch, one block at a time.",
		Columns: []string{"measure", "value", "goal"},
	}
	wire.Rows = append(wire.Rows, []string{"block events/s, one core", fmt.Sprintf("%.2fM", rate/1e6), goal(rate >= 1e6)})
	for _, b := range []kvevents.Batching{kvevents.EveryCall, kvevents.EveryInterval, kvevents.EveryFlush} {
		p50, p99, err := eventbench.Latency(b, samples)
		if err != nil {
			return nil, fmt.Errorf("latency, %v: %w", b, err)
		}
		wire.Rows = append(wire.Rows, []string{fmt.Sprintf("latency %v, p50 / p99", b), fmt.Sprintf("%.0f / %.0f us", float64(p50.Nanoseconds())/1e3, float64(p99.Nanoseconds())/1e3), "-"})
	}
	return []Table{over, wire}, nil
}

// overheadGoal is the goal column of the publisher's overhead: none for the control.
func overheadGoal(sub eventbench.Subscriber, ratio float64) string {
	if sub == eventbench.Control {
		return "-"
	}
	return goal(ratio <= 1.05)
}

// goal says whether a goal was met.
func goal(met bool) string {
	if met {
		return "met"
	}
	return "missed"
}
