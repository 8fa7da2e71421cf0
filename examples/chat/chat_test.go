package main

import (
	"bytes"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pagedkv/pagedkv/internal/testutil/gputest"
)

// transcript runs turns of the demo on a device and returns the user and bot lines.
func transcript(t *testing.T, device string, compact bool, turns int) string {
	t.Helper()
	conv, _ := transcriptOf(t, settings{device: device, compact: compact, background: 8}, demoTurns(turns))
	return conv
}

// demoTurns returns the first turns lines of the demo, over and over.
func demoTurns(turns int) []string {
	var lines []string
	for i := range turns {
		lines = append(lines, demo[i%len(demo)])
	}
	return lines
}

// transcriptOf runs lines on a chat made with s and returns the user and bot lines, and all it
// printed.
func transcriptOf(t *testing.T, s settings, lines []string) (conv, out string) {
	t.Helper()
	c, err := newChat(s)
	require.NoError(t, err)
	var buf bytes.Buffer
	require.NoError(t, c.run(lines, &buf))
	if s.hybrid {
		c.summary(&buf)
	}
	require.NoError(t, c.close())
	require.Positive(t, c.answers)
	require.Equal(t, c.answers, c.right, "every answer must be right:\n%s", buf.String())
	var said []string
	for _, l := range strings.Split(buf.String(), "\n") {
		if strings.HasPrefix(l, "you> ") || strings.HasPrefix(l, "bot> ") {
			said = append(said, l)
		}
	}
	return strings.Join(said, "\n"), buf.String()
}

// The answers are right, and the same whether the cache is compacted between every turn or
// never (compaction moves the conversation's blocks; the answers are read back through them).
func TestChatCompactionChangesNothing(t *testing.T) {
	every := transcript(t, "host", true, 24)
	never := transcript(t, "host", false, 24)
	require.Equal(t, never, every)
	require.Contains(t, every, "bot> !VKDEGAP ,OLLEh")
}

// The same loop on the GPU says exactly what it says on the host.
func TestChatSameOnGPU(t *testing.T) {
	gputest.Require(t)
	host := transcript(t, "host", true, 24)
	gpu := transcript(t, "cuda", true, 24)
	require.Equal(t, host, gpu)
	require.Equal(t, host, transcript(t, "cuda", false, 24))
}

// cacheLine finds a turn's prompt and the tokens of it that came from the cache.
var cacheLine = regexp.MustCompile(`prompt (\d+) tokens, (\d+) from the cache`)

// requireReuse checks, in a chat's output, that from the second turn of a conversation on all
// of the previous request (its prompt and answer) came from the prefix cache in whole blocks,
// and returns how many turns it saw.
func requireReuse(t *testing.T, out string) int {
	t.Helper()
	prev, answer, turns := 0, 0, 0 // the previous request's tokens; this turn's answer
	for _, l := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(l, "-- reset"):
			prev = 0
		case strings.HasPrefix(l, "bot> "):
			answer = len(l) - len("bot> ")
		}
		m := cacheLine.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		prompt, _ := strconv.Atoi(m[1])
		cached, _ := strconv.Atoi(m[2])
		require.Equal(t, prev/16*16, cached, "the previous request, in whole blocks: %s", l)
		prev = prompt + answer
		turns++
	}
	return turns
}

// Each turn re-sends the whole conversation, and from the second turn of a conversation on all
// of the previous request (its prompt and answer) comes from the prefix cache in whole blocks,
// blocks that compaction moved between turns included, while the answers, read through those
// blocks, stay right.
func TestChatReusesTheCache(t *testing.T) {
	c, err := newChat(settings{device: "host", compact: true, background: 8})
	require.NoError(t, err)
	var out bytes.Buffer
	require.NoError(t, c.run(demo, &out))
	require.NoError(t, c.close())
	require.Equal(t, c.answers, c.right)
	require.Equal(t, c.answers, requireReuse(t, out.String()))
}

// On the hybrid cache the answers, window layers' part included, are right over 20 turns whose
// conversations pass the 64-token window several times, and the same whether the cache is
// compacted between every turn or never.
func TestChatHybridCompactionChangesNothing(t *testing.T) {
	every, out := transcriptOf(t, settings{device: "host", compact: true, background: 8, hybrid: true}, demoTurns(20))
	never, _ := transcriptOf(t, settings{device: "host", compact: false, background: 8, hybrid: true}, demoTurns(20))
	require.Equal(t, never, every)
	require.Contains(t, every, "bot> !VKDEGAP ,OLLEh [Hell|Hell]", "the first answer: the window still reaches the start")
	longest := 0
	for _, m := range cacheLine.FindAllStringSubmatch(out, -1) {
		n, _ := strconv.Atoi(m[1])
		longest = max(longest, n)
	}
	require.Greater(t, longest, 3*window, "a conversation passes the window several times")
}

// heldLine finds, for each group of a hybrid turn, the blocks the request held at its end and
// at most after a decode step.
var heldLine = regexp.MustCompile(`(full|window): request (\d+) blocks \(at most (\d+) while decoding\)`)

// While a request decodes, the window group holds at most the window's blocks (one more where
// the window straddles a block boundary) and the sink block, however long the conversation and
// the answer grow; the full group holds all of them. Turns of 128-character messages answer
// with over 250 tokens, each passing the window four times.
func TestChatHybridWindowStaysBounded(t *testing.T) {
	long := strings.Repeat("The window slides; the sinks stay. ", 4)[:maxMessage/2]
	lines := append(demoTurns(3), long, long, "/reset", long, long)
	_, out := transcriptOf(t, settings{device: "host", compact: true, background: 8, hybrid: true}, lines)
	const bound = (window+15)/16 + 1 + (sinks+15)/16
	prompts := cacheLine.FindAllStringSubmatch(out, -1)
	answers := regexp.MustCompile(`(?m)^bot> (.*)$`).FindAllStringSubmatch(out, -1)
	held := heldLine.FindAllStringSubmatch(out, -1)
	require.Len(t, held, 2*len(prompts), "a full and a window part for every turn:\n%s", out)
	require.Len(t, answers, len(prompts))
	fullMost := 0
	for turn, p := range prompts {
		prompt, _ := strconv.Atoi(p[1])
		tokens := prompt + len(answers[turn][1])
		full, win := held[2*turn], held[2*turn+1]
		require.Equal(t, "full", full[1])
		require.Equal(t, "window", win[1])
		fullEnd, _ := strconv.Atoi(full[2])
		winMost, _ := strconv.Atoi(win[3])
		require.Equal(t, (tokens+15)/16, fullEnd, "turn %d: the full group holds all %d tokens", turn, tokens)
		require.LessOrEqual(t, winMost, bound, "turn %d: the window group while decoding", turn)
		require.Positive(t, winMost, "turn %d", turn)
		fullMost = max(fullMost, fullEnd)
	}
	require.GreaterOrEqual(t, fullMost, 4*bound, "the full group grows past the window's bound")
	require.Contains(t, out, "Layer groups at the end:")
}

// On the hybrid cache too, from the second turn of a conversation on all of the previous
// request comes from the prefix cache: every group serves it, the window group from the sink
// block and the blocks the next token reads.
func TestChatHybridReusesTheCache(t *testing.T) {
	_, out := transcriptOf(t, settings{device: "host", compact: true, background: 8, hybrid: true}, demo)
	require.Equal(t, len(demo)-1, requireReuse(t, out), "one line of the demo is /reset")
	hits := 0
	for _, m := range cacheLine.FindAllStringSubmatch(out, -1) {
		if m[2] != "0" {
			hits++
		}
	}
	require.Equal(t, len(demo)-3, hits, "every turn but the first of each conversation")
}

// The window layers' part of the answer is read through the window group's mask: attention that
// leaves out the sinks, or a window narrower than the group's, says wrong text.
func TestChatHybridWrongMaskIsWrongText(t *testing.T) {
	for _, c := range []struct {
		name          string
		window, sinks int
	}{{"no sinks", window, 0}, {"narrower window", window - 16, sinks}} {
		t.Run(c.name, func(t *testing.T) {
			ch, err := newChat(settings{device: "host", compact: true, background: 8, hybrid: true})
			require.NoError(t, err)
			ch.groups[1].window, ch.groups[1].sinks = c.window, c.sinks
			var out bytes.Buffer
			require.NoError(t, ch.run(demo, &out))
			require.NoError(t, ch.close())
			require.Less(t, ch.right, ch.answers, "%s", out.String())
			require.Contains(t, out.String(), "WRONG")
		})
	}
}

// The same hybrid loop on the GPU says exactly what it says on the host.
func TestChatHybridSameOnGPU(t *testing.T) {
	gputest.Require(t)
	on := func(device string, compact bool) string {
		conv, _ := transcriptOf(t, settings{device: device, compact: compact, background: 8, hybrid: true}, demoTurns(20))
		return conv
	}
	host := on("host", true)
	require.Equal(t, host, on("cuda", true))
	require.Equal(t, host, on("cuda", false))
}
