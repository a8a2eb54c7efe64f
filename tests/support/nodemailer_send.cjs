'use strict';
// Send a batch of messages through one pooled nodemailer transport, as an ESP would.
//
//   NODE_PATH=<dir>/node_modules node nodemailer_send.cjs JOB.json
//
// JOB.json: {host, port, localAddress, name, ca, user, pass, maxConnections,
//            messages: [{key, from, to: [...], raw: base64, use8BitMime} |
//                       {key, compose: {from, to, subject, text, headers}}]}
// Prints one JSON array to stdout: per message {key, ok, accepted, rejected, response}
// or {key, ok: false, error, code, response}. nodemailer's own log (the SMTP
// transcript, AUTH redacted by nodemailer) goes to stderr.
const fs = require('fs');
const util = require('util');
const nodemailer = require('nodemailer');

const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));

const logger = {};
for (const level of ['trace', 'debug', 'info', 'warn', 'error', 'fatal']) {
    logger[level] = (...args) => {
        const fields = typeof args[0] === 'object' && args[0] !== null ? args.shift() : {};
        const where = fields.cid ? ` [${fields.cid}]` : '';
        process.stderr.write(`${level}${where} ${util.format(...args)}\n`);
    };
}
logger.child = () => logger;

const transport = nodemailer.createTransport({
    pool: true,
    maxConnections: job.maxConnections,
    maxMessages: Infinity,
    host: job.host,
    port: job.port,
    secure: false, // plain connection, then STARTTLS
    requireTLS: true, // fail instead of sending in the clear
    localAddress: job.localAddress,
    name: job.name, // EHLO name
    tls: { ca: [job.ca] },
    auth: { user: job.user, pass: job.pass },
    logger,
    debug: true,
});

function mail(message) {
    if (message.compose) {
        return message.compose;
    }
    return {
        envelope: { from: message.from, to: message.to, use8BitMime: message.use8BitMime },
        raw: Buffer.from(message.raw, 'base64'),
    };
}

async function main() {
    const results = await Promise.all(
        job.messages.map(message =>
            transport.sendMail(mail(message)).then(
                info => ({
                    key: message.key,
                    ok: true,
                    accepted: info.accepted,
                    rejected: info.rejected,
                    response: info.response,
                }),
                err => ({
                    key: message.key,
                    ok: false,
                    error: String(err),
                    code: err.code,
                    response: err.response,
                })
            )
        )
    );
    transport.close();
    process.stdout.write(JSON.stringify(results));
}

main().catch(err => {
    process.stderr.write(`fatal ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
});
