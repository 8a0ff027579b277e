#!/usr/bin/env node
// Produce Flywheel events to Kafka with kafkajs: one JSON event per stdin line.
//
//   node produce.js --brokers 127.0.0.1:9092 --topic flywheel.feedback.v1 < events.jsonl
//
// Each line is sent verbatim as the message value, keyed by its `interaction_id`
// (interactions and feedback are both keyed so, which co-partitions them). Prints
// one line of JSON at the end: how many were sent and their partitions/offsets.
"use strict";

const readline = require("node:readline");
const { Kafka, logLevel } = require("kafkajs");

function parseArgs(argv) {
  const options = { brokers: "127.0.0.1:9092", topic: "flywheel.feedback.v1" };
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i].replace(/^--/, "");
    if (!(name in options) || argv[i + 1] === undefined) {
      throw new Error(`unknown or empty option ${argv[i]}`);
    }
    options[name] = argv[i + 1];
  }
  return options;
}

async function readMessages() {
  const messages = [];
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line.trim() === "") continue;
    const event = JSON.parse(line);
    messages.push({ key: String(event.interaction_id), value: line });
  }
  return messages;
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  const messages = await readMessages();
  const kafka = new Kafka({
    clientId: "flywheel-node-example",
    brokers: options.brokers.split(","),
    logLevel: logLevel.WARN,
  });
  // Not idempotent: the embedded broker (Tansu) lacks InitProducerId. Retries may
  // duplicate a message; the collector keeps one row per event_id.
  const producer = kafka.producer({ allowAutoTopicCreation: false, idempotent: false });
  await producer.connect();
  try {
    const results = await producer.send({ topic: options.topic, acks: -1, messages });
    const placed = results.map((r) => [r.partition, r.baseOffset]);
    console.log(JSON.stringify({ sent: messages.length, placed }));
  } finally {
    await producer.disconnect();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
