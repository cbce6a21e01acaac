// Refreshes the picture every second from /stages: each stage's box is coloured by how it
// spent the last seconds (idle blue-grey, busy red, backpressured dark grey) and shows its
// items per second, items out, queue depth, drops, dead letters and tier.
"use strict";
const previous = new Map();

function colour(busy, backpressured) {
  // From idle (pale blue) towards busy (red) or backpressured (dark grey), by share.
  const idle = [210, 45, 90], hot = [0, 75, 62], blocked = [270, 10, 45];
  const mix = (i) => idle[i] + (hot[i] - idle[i]) * busy + (blocked[i] - idle[i]) * backpressured;
  const hue = busy >= backpressured ? hot[0] : blocked[0];
  return `hsl(${busy + backpressured > 0.05 ? hue : idle[0]}, ${mix(1).toFixed(0)}%, ${mix(2).toFixed(0)}%)`;
}

function rate(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " k";
  return n.toFixed(0);
}

function drops(stage) {
  return Object.values(stage.dropped || {}).reduce((a, b) => a + b, 0);
}

function show(stage, now) {
  const box = document.querySelector(`g.stage[data-stage="${CSS.escape(stage.stage)}"]`);
  if (!box) return;
  const last = previous.get(stage.stage);
  const perSecond = last ? Math.max(0, (stage.out - last.out) / ((now - last.at) / 1000)) : 0;
  previous.set(stage.stage, { out: stage.out, at: now });
  const busy = stage.busy ?? 0, backpressured = stage.backpressured ?? 0;
  box.querySelector("rect").style.fill = colour(busy, backpressured);
  box.classList.toggle("bottleneck", stage.bottleneck === true);
  box.querySelector("text.rate").textContent =
    `${rate(perSecond)}/s · out ${stage.out} · ${(busy * 100).toFixed(0)}% busy`;
  box.querySelector("text.queue").textContent =
    `queue ${stage.input_queue_depth} · drops ${drops(stage)} · dead ${stage.dead_lettered}` +
    (stage.tier ? ` · ${stage.tier}` : "");
  box.querySelector("title").textContent =
    `${stage.stage} (${stage.status}): ${(busy * 100).toFixed(0)}% busy, ` +
    `${(backpressured * 100).toFixed(0)}% backpressured, ${((stage.idle ?? 1) * 100).toFixed(0)}% idle`;
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const answer = await fetch("/stages", { cache: "no-store" });
    const stages = await answer.json();
    const now = performance.now();
    stages.forEach((s) => show(s, now));
    const bottleneck = stages.find((s) => s.bottleneck);
    status.textContent = `updated ${new Date().toLocaleTimeString()}` +
      (bottleneck ? ` · bottleneck: ${bottleneck.stage}` : "");
  } catch (e) {
    status.textContent = `no answer from the pipeline (${e})`;
  }
}

refresh();
setInterval(refresh, 1000);
