package redis

import (
	"context"
	"strconv"
	"sync/atomic"
)

var syncs atomic.Uint64

// SetEvictionQueue bounds the evictions s queues for TakeEvictions at n instead of
// EvictionQueue.
func SetEvictionQueue(s *Store, n int) {
	s.ev.mu.Lock()
	s.ev.limit = n
	s.ev.mu.Unlock()
}

// Sync waits until the subscription of s has been confirmed more than after times, then until
// the watcher has read every notification the server sent before the call: it sends a PING
// down the subscription, which the server answers after them, and waits for the PONG. It
// returns how many times the subscription has been confirmed.
func Sync(ctx context.Context, s *Store, after uint64) (uint64, error) {
	e := &s.ev
	wait := func(done func() bool) error {
		for {
			e.mu.Lock()
			ok, ch := done(), e.changed
			e.mu.Unlock()
			if ok {
				return nil
			}
			select {
			case <-ch:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	if err := wait(func() bool { return e.confirms > after }); err != nil {
		return 0, err
	}
	e.mu.Lock()
	ps, confirms := e.ps, e.confirms
	e.mu.Unlock()
	token := "sync-" + strconv.FormatUint(syncs.Add(1), 10)
	if err := ps.Ping(ctx, token); err != nil {
		return 0, err
	}
	return confirms, wait(func() bool { return e.pong == token })
}
