package ratelimit_test

import (
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keyvault/keyvault/ratelimit"
)

// The bytes one per-user state may cost, map slots and key included, as the
// package doc states them: about 200 with a typical key (a 9-byte namespace
// and a 36-byte UUID), about 350 with the longest valid key (64 and 128
// bytes).
const (
	typicalStateBytes = 200
	longestStateBytes = 350
)

var (
	typicalNS = "messenger"
	longestNS = strings.Repeat("n", 64)
)

// userIDs yields distinct user IDs of the given length: a decimal counter,
// left-padded with 'u'.
func userID(buf []byte, length, i int) string {
	buf = buf[:0]
	n := strconv.AppendInt(make([]byte, 0, 20), int64(i), 10)
	for range length - len(n) {
		buf = append(buf, 'u')
	}
	return string(append(buf, n...))
}

func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// TestMemoryBound floods the limiter with a million distinct users, each
// guessing once: at no point does it hold more than MaxKeys states, and the
// heap grows by less than MaxKeys states of the stated size. Not parallel:
// the heap measurement needs the process to itself.
func TestMemoryBound(t *testing.T) {
	tests := []struct {
		name      string
		ns        string
		userLen   int
		perState  uint64
		maxKeys   int
		distinct  int
		wantAtEnd int // the states held after the flood, at least
	}{
		{"typical keys", typicalNS, 36, typicalStateBytes, ratelimit.DefaultMaxKeys, 1_000_000, ratelimit.DefaultMaxKeys / 2},
		{"longest keys", longestNS, 128, longestStateBytes, ratelimit.DefaultMaxKeys, 300_000, ratelimit.DefaultMaxKeys / 2},
		{"small bound", typicalNS, 36, typicalStateBytes, 1000, 100_000, 1000 / 2 / 16 * 16},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := new(clock)
			before := heapAlloc()
			l := ratelimit.New(ratelimit.Config{GuessesPerUser: perMinute(5, 5)},
				ratelimit.Options{Now: clk.Now, MaxKeys: tt.maxKeys})
			buf := make([]byte, 0, 128)
			for i := range tt.distinct {
				clk.Advance(time.Microsecond) // the flood takes less than the idle period (60s)
				if err := guess(l, "messenger", tt.ns, userID(buf, tt.userLen, i)); err != nil {
					t.Fatalf("user %d: %v", i, err)
				}
				if n := l.Keys(); n > tt.maxKeys {
					t.Fatalf("after user %d: Keys() = %d, more than MaxKeys %d", i, n, tt.maxKeys)
				}
			}
			held := l.Keys()
			grown := int64(heapAlloc()) - int64(before)
			t.Logf("%d states held after %d users (MaxKeys %d): heap grown by %d bytes, %d a state; bound %d bytes (%d a state)",
				held, tt.distinct, tt.maxKeys, grown, grown/int64(held), uint64(tt.maxKeys)*tt.perState, tt.perState)
			if held < tt.wantAtEnd {
				t.Errorf("Keys() = %d after the flood, want at least %d: the generations should be near full", held, tt.wantAtEnd)
			}
			if grown > int64(uint64(tt.maxKeys)*tt.perState) {
				t.Errorf("the heap grew by %d bytes, more than MaxKeys*%d = %d", grown, tt.perState, uint64(tt.maxKeys)*tt.perState)
			}

			// The most recent user's state is held: a flood resets older ones only.
			last := userID(buf, tt.userLen, tt.distinct-1)
			for range 4 {
				if err := guess(l, "messenger", tt.ns, last); err != nil {
					t.Fatal(err)
				}
			}
			if err := guess(l, "messenger", tt.ns, last); err == nil {
				t.Error("the latest user's sixth guess was admitted: its state was lost")
			}

			// Idle for the idle period, everything is dropped.
			clk.Advance(60 * time.Second)
			if n := l.Keys(); n != 0 {
				t.Errorf("after the idle period: Keys() = %d, want 0", n)
			}
			if freed := int64(heapAlloc()) - int64(before); freed > 64<<10 {
				t.Errorf("after the idle period the heap is still %d bytes above the start", freed)
			}
			runtime.KeepAlive(l)
		})
	}
}

// TestBytesPerState measures what one state costs when the generations are
// not rotating: the figure the package doc states.
func TestBytesPerState(t *testing.T) {
	tests := []struct {
		name     string
		ns       string
		userLen  int
		perState uint64
	}{
		{"typical keys", typicalNS, 36, typicalStateBytes},
		{"longest keys", longestNS, 128, longestStateBytes},
	}
	const n = 50_000
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := new(clock)
			ids := make([]string, n)
			buf := make([]byte, 0, 128)
			for i := range ids {
				ids[i] = userID(buf, tt.userLen, i)
			}
			l := ratelimit.New(ratelimit.Config{GuessesPerUser: perMinute(5, 5)},
				ratelimit.Options{Now: clk.Now, MaxKeys: 1 << 22})
			before := heapAlloc()
			for _, id := range ids {
				if err := guess(l, "messenger", tt.ns, id); err != nil {
					t.Fatal(err)
				}
			}
			grown := heapAlloc() - before
			if l.Keys() != n {
				t.Fatalf("Keys() = %d, want %d", l.Keys(), n)
			}
			t.Logf("%s: %d bytes a state (key of %d bytes)", tt.name, grown/n, 1+len(tt.ns)+tt.userLen)
			if grown/n > tt.perState {
				t.Errorf("%d bytes a state, more than the %d the package doc states", grown/n, tt.perState)
			}
			runtime.KeepAlive(l)
			runtime.KeepAlive(ids)
		})
	}
}

func BenchmarkGuess(b *testing.B) {
	b.Run("distinct keys", func(b *testing.B) {
		clk := new(clock)
		l := ratelimit.New(defaults, ratelimit.Options{Now: clk.Now})
		ids := make([]string, 1<<20)
		for i := range ids {
			ids[i] = fmt.Sprintf("%036d", i)
		}
		i := 0
		for b.Loop() {
			clk.Advance(time.Microsecond)
			_ = guess(l, "messenger", "messenger", ids[i&(len(ids)-1)])
			i++
		}
		b.ReportMetric(float64(l.Keys()), "states")
	})
	b.Run("one hot key, admitted", func(b *testing.B) {
		clk := new(clock)
		l := ratelimit.New(ratelimit.Config{
			GuessesPerUser:        perSecond(1e9, 1e9),
			WrongGuessesPerClient: perSecond(1e9, 1e9),
		}, ratelimit.Options{Now: clk.Now})
		for b.Loop() {
			clk.Advance(time.Microsecond)
			if err := guess(l, "messenger", "messenger", "alice"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("one hot key, refused", func(b *testing.B) {
		clk := new(clock)
		l := ratelimit.New(defaults, ratelimit.Options{Now: clk.Now})
		for b.Loop() {
			_ = guess(l, "messenger", "messenger", "alice")
		}
	})
	b.Run("one hot key, parallel", func(b *testing.B) {
		clk := new(clock)
		l := ratelimit.New(ratelimit.Config{
			GuessesPerUser:        perSecond(1e9, 1e9),
			WrongGuessesPerClient: perSecond(1e9, 1e9),
		}, ratelimit.Options{Now: clk.Now})
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				clk.Advance(time.Microsecond)
				_ = guess(l, "messenger", "messenger", "alice")
			}
		})
	})
}

// defaults are the shipped limits (config's defaults).
var defaults = ratelimit.Config{
	GuessesPerUser:           perMinute(5, 5),
	RequestsPerClient:        perSecond(500, 1000),
	WrongGuessesPerClient:    perMinute(600, 600),
	HSMSharePerClientPercent: ratelimit.DefaultHSMSharePerClientPercent,
}
