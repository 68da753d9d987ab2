/* fuzz/fuzz_chat.c - libFuzzer target for the chat-template interpreter (chat.c): any bytes as a template,
 * rendered for a fixed conversation (its JSON form too), with and without the generation prompt. A template
 * that renders must give text of the length it says; one that does not must say why in one line. Limits on
 * steps, nesting, memory and output keep every input to milliseconds.
 *
 *   make fuzz FUZZ_SECONDS=600        (builds build/fuzz/fuzz_chat with clang -fsanitize=fuzzer,...)
 *   build/fuzz/fuzz_chat CRASH_FILE   (replays one input) */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "chat.h"

static volatile unsigned checksum;

static void check(char *text, size_t len, const char *err) {
    if (!text) {
        if (err[0] == '\0' || strchr(err, '\n')) abort(); /* the message: one line, never empty */
        return;
    }
    if (strlen(text) > len) abort(); /* NUL-terminated at len (the text itself may hold NUL bytes) */
    for (size_t i = 0; i < len; i++) checksum += (unsigned char)text[i];
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const ChatMessage conversation[] = {{"system", "Be brief.", 9}, {"user", "Hello \xff", 7},
                                               {"assistant", "<think>x</think>\n\nHi", 20}, {"user", " Who? ", 6}};
    static const char json[] = "[{\"role\": \"user\", \"content\": \"caf\\u00e9\", \"n\": [1, 2.5, null, true]},"
                               " {\"role\": \"assistant\", \"content\": \"ok\", \"tool_calls\": [{\"name\": \"f\"}]}]";
    ChatSection chat = {(const char *)data, size, 2,
                        {{"bos_token", "<s>", 9, 3}, {"eos_token", "</s>", 9, 4}}};
    char err[512];
    size_t len = 0;
    for (int gen = 0; gen < 2; gen++) {
        err[0] = '\0';
        check(chat_render(&chat, conversation, 4, gen, &len, err, sizeof err), len, err);
        err[0] = '\0';
        check(chat_render_json(&chat, json, sizeof json - 1, gen, &len, err, sizeof err), len, err);
    }
    return 0;
}
