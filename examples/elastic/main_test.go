package main

import (
	"bytes"
	"regexp"
	"testing"

	"github.com/stretchr/testify/require"
)

// The single-model quick start maps memory on demand on the host backend, reads it back, and
// returns everything: physical memory is 0 before, the size mapped in between, 0 after.
func TestSingleQuickStart(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, run(&out, "host", 8<<30, 64<<20))
	s := out.String()
	require.Regexp(t, `reserved: +virtual +8192 MiB +physical +0 MiB`, s)
	require.Regexp(t, `mapped 64 MiB on demand: +virtual +8192 MiB +physical +64 MiB`, s)
	require.Regexp(t, `unmapped: +virtual +8192 MiB +physical +0 MiB +mapped pages +0`, s)
	require.Contains(t, s, "closed: every reservation, handle and mapping returned")
}

// The multi-model quick start under a 512 MiB limit: the first model fills it and is refused
// with numbers that say nothing more can be had, the second gets what the first's finished
// requests free (a compaction making room), and the lowered limit is met by sleep.
func TestMultiQuickStart(t *testing.T) {
	var out bytes.Buffer
	require.NoError(t, runMulti(&out, "host", 512<<20))
	s := out.String()
	require.Regexp(t, `chat-8b is refused its request \d+: .* 0 can be had now`, s)
	require.Regexp(t, `chat-8b admitted \d+ requests: +used +512 / 512 MiB`, s)
	m := regexp.MustCompile(`code-8b admitted (\d+) requests`).FindStringSubmatch(s)
	require.NotNil(t, m, s)
	require.NotEqual(t, "0", m[1], "the second model got memory: %s", s)
	require.Regexp(t, `chat-8b idle and asleep: +used +\d+ / 256 MiB`, s)
	require.Contains(t, s, "code-8b unregistered:")
}
