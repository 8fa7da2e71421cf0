package main

import (
	"bufio"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// scrape fetches /metrics and returns each sample line's value by its series.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(string(body)))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		require.NoError(t, err, line)
		out[line[:i]] = v
	}
	return out
}

// The example's /metrics, scraped over HTTP, reports what the pool's Stats say.
func TestScrapeMetrics(t *testing.T) {
	for _, withLedger := range []bool{false, true} {
		o := options{models: []string{"llama", "qwen"}, limit: 64 << 20, seed: 3}
		if withLedger {
			o.ledger = filepath.Join(t.TempDir(), "ledger")
		}
		s, err := newServer(o)
		require.NoError(t, err)
		for range 300 {
			require.NoError(t, s.step())
		}
		for _, m := range s.models { // the reserve goroutines are done: the scrape and Stats agree
			require.NoError(t, m.m.Settle())
		}
		srv := httptest.NewServer(s.handler())
		got := scrape(t, srv.URL)
		srv.Close()
		st := s.pool.Stats()
		require.Len(t, st.Models, 2)
		for _, m := range st.Models {
			lbl := `{model="` + m.Name + `",pool="shared"}`
			require.Positive(t, m.MappedBytes)
			require.Equal(t, float64(m.MappedBytes), got["pagedkv_mapped_bytes"+lbl], m.Name)
			require.Equal(t, float64(m.Sequences), got["pagedkv_sequences"+lbl], m.Name)
			require.Equal(t, float64(m.LiveBlocks), got["pagedkv_live_blocks"+lbl], m.Name)
			require.Positive(t, got[`pagedkv_prefix_hit_tokens_total{model="`+m.Name+`",pool="shared",tier="gpu"}`], "shared system prompts hit")
			require.Equal(t, float64(m.Prefix.QueryTokens), got["pagedkv_prefix_query_tokens_total"+lbl])
		}
		require.Equal(t, float64(64<<20), got[`pagedkv_limit_bytes{pool="shared"}`])
		require.Equal(t, float64(st.Used), got[`pagedkv_used_bytes{pool="shared"}`])
		if withLedger {
			require.Equal(t, float64(st.Used), got[`pagedkv_ledger_used_bytes{ledger="gpu0"}`])
			require.Equal(t, float64(64<<20), got[`pagedkv_ledger_limit_bytes{ledger="gpu0"}`])
		}
		s.close()
	}
}

// With -kv-events every model publishes its events, one batch per step that cached or evicted.
func TestKVEvents(t *testing.T) {
	s, err := newServer(options{models: []string{"llama", "qwen"}, limit: 64 << 20, seed: 3,
		kvEvents: "tcp://127.0.0.1:*", pod: "pod-0"})
	require.NoError(t, err)
	defer s.close()
	for range 300 {
		require.NoError(t, s.step())
	}
	for _, md := range s.models {
		require.Equal(t, "kv@pod-0@"+md.name, md.pub.Topic())
		st := md.pub.Stats()
		require.Positive(t, st.Blocks, md.name)
		require.LessOrEqual(t, st.Batches, uint64(300), "at most one batch a step")
	}
}
