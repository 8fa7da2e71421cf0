package main

import (
	"bytes"
	"fmt"
	"regexp"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/redistest"
)

func TestMain(m *testing.M) {
	replicaMain()
	m.Run()
}

// served runs a fleet of n replicas on Redis at addr and returns the share of prompt tokens
// served from a cache.
func served(t *testing.T, addr string, n int) float64 {
	var out bytes.Buffer
	require.NoError(t, route(addr, n, 1, &out))
	m := regexp.MustCompile(`\(([0-9.]+)%\) served from a cache`).FindStringSubmatch(out.String())
	require.NotNil(t, m, out.String())
	v, err := strconv.ParseFloat(m[1], 64)
	require.NoError(t, err)
	return v
}

// Two replica processes on one Redis, turns routed at random, serve from some cache at least
// 90% of what one replica serving everything does, and more than the same fleet without the
// cluster tier; every hit's K/V is checked by the replica that reads it (a wrong one fails the
// run).
func TestFleetSharesThroughRedis(t *testing.T) {
	one := served(t, "none", 1)
	srv := redistest.Start(t)
	with, without := served(t, srv.Addr, 2), served(t, "none", 2)
	t.Logf("served from a cache: one replica %.1f%%; two with Redis %.1f%%, without %.1f%%", one, with, without)
	assert.GreaterOrEqual(t, with, 0.9*one)
	assert.Greater(t, with, without+5, fmt.Sprintf("%.1f vs %.1f", with, without))
}
