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

// served runs the fleet on Redis at addr and returns the share of prompt tokens served from a
// cache.
func served(t *testing.T, addr string) float64 {
	var out bytes.Buffer
	require.NoError(t, route(addr, 2, 1, &out))
	m := regexp.MustCompile(`\(([0-9.]+)%\) served from a cache`).FindStringSubmatch(out.String())
	require.NotNil(t, m, out.String())
	v, err := strconv.ParseFloat(m[1], 64)
	require.NoError(t, err)
	return v
}

// Two replica processes on one Redis, turns routed at random, serve more of the prompts from a
// cache than the same fleet without the cluster tier; every hit's K/V is checked by the
// replica that reads it (a wrong one fails the run).
func TestFleetSharesThroughRedis(t *testing.T) {
	srv := redistest.Start(t)
	with, without := served(t, srv.Addr), served(t, "none")
	t.Logf("served from a cache: %.1f%% with Redis, %.1f%% without", with, without)
	assert.Greater(t, with, without+5, fmt.Sprintf("%.1f vs %.1f", with, without))
}
