"""Penn Treebank tokenisation of captions, exactly as pycocoevalcap's PTBTokenizer does it.

    tokenize_captions(["The heart is normal.", "No effusion."])  # -> ["the heart is normal", ...]
    tokenize("It's 4.5 cm (stable).")        # -> "it 's 4.5 cm -lrb- stable -rrb-"

pycocoevalcap (the coco-caption code that report-generation papers score with) joins all captions
of a call with newlines, runs Stanford CoreNLP 3.4.1's PTBTokenizer jar on them with
`-preserveLines -lowerCase`, reads one output line per caption and drops punctuation tokens. This
module gives the same strings without java.

Where the rules come from. Two sources only: the Penn Treebank tokenisation conventions (split
punctuation off words; clitics n't 's 're 've 'll 'd 'm become tokens; brackets become -LRB- -RRB-
-LSB- -RSB- -LCB- -RCB-; double quotes become `` and ''; an abbreviation keeps its period and a
sentence-final one gets an extra "."; numbers keep their internal . , :), and the jar's observed
behaviour: it was run as a black box on hundreds of thousands of probe strings (every character of
the Basic Multilingual Plane in three contexts, every 1-4 letter string before ". x", ". 5" and
". Xy", and millions of generated report-like lines), and each rule below says what it reproduces.
The module was written without CoreNLP's lexer source. tests/test_metrics.py compares it with the
jar token for token on thousands of report-like lines.

Known differences: a line break inside a caption counts as a space (pycocoevalcap replaces "\n"
but not \r, \v, \f, U+2028 or U+2029, at which the jar starts a new line, shifting every later
caption onto the wrong sample). A soft hyphen (U+00AD) next to a digit, hyphen or period, and
letters of scripts that Unicode added after version 6 (the jar's character tables are older than
Python's) may be tokenised differently.
"""

import re
import unicodedata

# pycocoevalcap drops these tokens after tokenising. Its bracket names are upper case while the
# jar's output is lower-cased, so brackets are never dropped (observed in pycocoevalcap's scores).
PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
               "-", "--", "...", ";"}


# --- characters ---------------------------------------------------------------------------------

def _ranges(pred):
    """Regex character-class body for the BMP characters where pred holds."""
    out, start = [], None
    for i in range(0x10001):
        ok = i < 0x10000 and not 0xD800 <= i < 0xE000 and pred(chr(i))
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            a, b = re.escape(chr(start)), re.escape(chr(i - 1))
            out.append(a if start == i - 1 else f"{a}-{b}")
            start = None
    return "".join(out)


def _is_word_char(c):
    """Letters, digits and combining marks form words. The exceptions are what the jar does in the
    Latin, Greek, Cyrillic and Armenian blocks and with marks that any script may carry (observed):
    spacing modifier letters and a few signs join words; marks for symbols, variation selectors
    (the emoji one after a heart) and letters added after Unicode 6 do not."""
    o = ord(c)
    if any(a <= o <= b for a, b in ((0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF),
                                    (0xFE00, 0xFE0F), (0xFE20, 0xFE2F), (0x528, 0x52F))):
        return False
    if o in (0x37F, 0x560, 0x588):
        return False
    if 0x2C2 <= o <= 0x2FF or o in (0x375, 0x384, 0x385, 0x3F6) or 0x55A <= o <= 0x55F:
        return True
    return unicodedata.category(c)[0] == "L" or unicodedata.category(c) in ("Nd", "Mn", "Mc")


_A = "[" + _ranges(_is_word_char) + "]"        # a word character
_L0 = "(?:(?![0-9])" + _A + ")"                # a letter: a word character but an ASCII digit
_L = "(?:" + _L0 + "|\xad)"                    # a letter or a soft hyphen
_D = "[0-9]"
# Characters that the jar keeps as one-character tokens (observed by running every BMP character
# through it); characters that are neither these, word characters nor spaces it deletes.
_SYMBOL_CHARS = (
    "\"-,:->\\[-^`{-~\x80\x91-\x94\x96\x97\xa1-\xa9\xab-\xb4\xb6-\xb9\xbb-\xbf\xd7\xf7\u037e\u0387"
    "\u0589\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060c\u0614\u061b\u061e\u061f"
    "\u066a\u066d\u06d4\u0700-\u070d\u07f6-\u07f8\u0964\u0965\u0e3f\u0e4f\u1fbd\u2013-\u2023\u2026"
    "\u2030-\u203b\u203e-\u2042\u2044\u2070\u2074-\u207e\u2080-\u208e\u20a0\u20a4\u20ac\u2100\u2101"
    "\u2103-\u2106\u2108\u2109\u2114\u2116-\u2118\u211e-\u2123\u2125\u2127\u2129\u212e\u213a\u213b"
    "\u2140-\u2144\u214a-\u214d\u214f\u2153-\u215e\u2190-\u2bff\u3001\u3002\u3012\u30fb"
    "\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\uffe0\uffe1\uffe5\uffe6/@\xad")
# The jar starts a new output line at each of these (observed: also at \r, \x0b, \x0c, U+2028/9,
# which pycocoevalcap does not replace, so a caption holding one shifts the captions after it).
_NEWLINE = re.compile(r"\r\n|[\n\r\x0b\x0c\u2028\u2029]")
_SP = r"[^\S\n\r\x0b\x0c\x85\u2028\u2029]"     # a space within a line (\x85 is an ellipsis)
_SPACES = re.compile(rf"(?:{_SP}|[\u200b\ufeff]|(?i:&nbsp;))+")

# --- vocabulary (observed: every 1-4 letter string, and a list of longer ones, in three contexts) -
# Written in lower case, a letter matches either case; an upper-case letter matches only itself
# ("Mass." keeps its period, "mass." does not); a bracketed letter matches only that lower-case
# letter ("Pty." and "PTy." keep it, "PTY." does not).
# Titles never end a sentence: "Dr." keeps its period before anything.
_TITLES = ("mr mrs ms messrs mlle mme dr drs prof profs rev hon gen col lt maj capt cmdr comdr adm "
           "brig lieut sgt cpl pvt pfc sfc spc ens insp supt supts det sen sens rep reps gov govs "
           "pres msgr st ste mt ft ph jos wm alex vs cf assoc asst atty ave dept cie adj adv elec "
           "invt natl m[f]g m[t]g").split()
# These may end a sentence: they keep their period, and a "." follows when the sentence ends.
_ENDERS = ("etc jr sr esq inc ltd co corp cos bros plc bhd assn univ pt[e] pt[e]s pt[y] pt[y]s "
           "ppt[e] ppt[y] sys intl est ext tel sq seq al rd blvd bldg jan feb mar apr jun jul aug "
           "sep sept oct nov dec mon tue tues wed thu thurs fri ala ariz Ark Az calif colo conn ct "
           "dak Del fla ga Ill ind kan kans ky La md Mass mich minn Miss mo mont neb nev okla Ore "
           "Pa penn rt tenn Tex va vt Wash wis wisc wyo ph.d").split()
# These keep their period only before a number: "No. 5", but "no." at the end of a sentence.
_BEFORE_NUMBERS = "no nos fig figs art pp ca op prop".split()
# A capitalised one of these words after "X." (one letter) makes the letter end the sentence.
_STARTERS = ("the a an in as at it if so we he she you they this that these there here their our "
             "her one other some many more such what when while then now once since after about "
             "last yet but however according earlier additionally mr. ms.").split()
# "report.pdf" is one token with these endings, "report.xyz" is two (observed).
_FILE_TYPES = ("c h x gz pl ps py bat bmp cgi cpp dll doc exe gif htm jar jpg mov pdf php png ppt "
               "sql tar txt wav xml zip docx html java jpeg mp3 class").split()


def _alternation(words):
    """Regex alternation for words in the notation of the lists above."""
    def one(w):
        out = re.sub(r"\[(\w)\]", r"\1", w)
        return "".join(c if c.isupper() or c == "." or f"[{c}]" in w else f"[{c}{c.upper()}]"
                       for c in out).replace(".", r"\.")
    return "(?:" + "|".join(one(w) for w in sorted(words, key=len, reverse=True)) + ")"


def _capitalised(words):
    return "(?:" + "|".join(w[0].upper() + "".join(
        re.escape(c) if c == "." else f"[{c}{c.upper()}]" for c in w[1:]) for w in words) + ")"


# --- shapes -------------------------------------------------------------------------------------
_APOS = "(?:'|\u2019|(?i:&apos;))"             # ' and its typographic and HTML spellings
_INNER = "(?:['\u2019\u2018`\u201b]|(?i:&apos;))"  # what the jar accepts inside o'clock
_CURLY = "\u2018\u2019\u201b\u201c\u201d\u201e\u00ab\u00bb\u2039\u203a\x91-\x94"
# A soft hyphen may sit inside a word and after a letter, not after a digit; it may start a
# word or number but not a hyphenated word (observed: "\xadx-ray" is "x" "-" "ray")
_PART = rf"{_A}(?:\xad*{_A})*(?:(?<![0-9])\xad+)?"
_WORD = rf"{_PART}(?:[-\u2010\u2011\u058a](?:\xad*{_PART}|\xad+))*"   # heart, x-ray, 12-lead
_ACRO = r"[A-Za-z]\.(?:[A-Za-z]\.)+"            # U.S., a.m., b.i.d.
_NAME = rf"[dlDLoO]{_INNER}{_A}{{2,}}"           # o'clock, O'Brien, d'Alembert, l'hôpital
_NAME2 = rf"(?:n|[A-HJ-XZ]){_INNER}{_L0}{{2,}}"  # C'mon, J'accuse (no compounds, see below)
_DOTTED = rf"{_L}{_A}*(?:\.{_L}{_A}*)+"         # normal.the, dr.x (no space after the period)
_BANG = rf"{_L}{_A}*(?:[.!?]{_L}{_A}*)+"        # yahoo!x, heart?lungs
_ASEG = rf"(?:{_ACRO}|[A-Za-z0-9]+)"
_ASCII_DOTTED_TAIL = r"[A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z][A-Za-z0-9]*)+(?:-(?:[A-Za-z0-9]+|\xad+))+"
# hyphen compounds whose parts may be acronyms or names (8-a.m., normal-o'clock), or underscore
# compounds (intact_osseous, d'ab_c)
_COMPOUND = rf"(?:{_NAME}|{_ASEG})(?:-(?:{_NAME}|{_ASEG}))+"
_UCOMPOUND = rf"(?:{_NAME}|{_A}+)(?:[-_](?:{_NAME}|{_A}+))+"
_DOTTED_COMPOUND = rf"(?:{_DOTTED}|[A-Za-z0-9]+)[.,]+-(?:{_ASEG}|\xad+)(?:-{_ASEG})*"  # U.S.-based
_NUMBER_TAIL = (rf"[A-Za-z0-9]+(?:[.,]+[A-Za-z0-9]+)+[.,]*-{_ASEG}(?:-{_ASEG})*")  # 1.5e-5, 4.5-cm
_SLASHED = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}"   # a part of and/or, s/p, 12/03/2019
_TAG_NAME = r"[A-Za-z][A-Za-z0-9_:.-]*"
_TAG = (rf"</?{_TAG_NAME}(?: +{_TAG_NAME}(?: *= *(?:\"[^\"]*\"|'[^']*'))?)* */?>"
        rf"|<![A-Za-z-][^>\n]*>|<\?[A-Za-z][^>\n]*>|<{_TAG_NAME}\n{_TAG_NAME}>")
# 's 'd 'm 'n 'll 're 've; after a plain apostrophe only if no letter follows ("'sa" opens a quote)
_CLITIC = (r"'(?:[sSdDmM]|[lL][lL]|[rR][eE]|[vV][eE])(?![A-Za-z])|'[nN](?=\s|\Z)"
           r"|(?:\u2019|(?i:&apos;))(?:[sSdDmMnN]|[lL][lL]|[rR][eE]|[vV][eE])")
# a host name before .com: ASCII lower case and #%&*+~, or any non-ASCII character but a capital
# (observed: "“ill.COMPARED" gives "“ill.com" "pared"; "Seen.comx" is one dotted word)
_HOST = "[a-z#%&*+~" + _ranges(lambda c: ord(c) > 0x7F and not c.isupper()) + "]+"
_NOT_IN_URL = r'\s"(){}<>|'
_NOT_IN_EMAIL = r' \t\n\r\x0c\xa0"(){}<>|'

# --- token patterns -----------------------------------------------------------------------------
# At each position the longest match wins and the earlier pattern wins a tie. A pattern may look
# past its token (the group "t" is the token, the rest is context): the context counts towards its
# length. Both are how the jar chooses (observed: "gonna." splits into "gon na" but "gonna's" does
# not, "etc.-x" is "etc." "-" "x" but "etc.-xy" is one token).
_PATTERNS = [
    ("tag", _TAG),                                               # <br>, <p class='x'>
    # numbers that keep their spaces: phone numbers, "(555) 123-4567", "+44 20 7946 0958", and
    # fractions, "2 1/2", "1-1/2"
    ("spaced", rf"(?:\({_D}{{2,3}}\)[ \xa0]?|\+?{_D}{{2,4}}[- \xa0])"
               rf"{_D}{{3,4}}[- \xa0]?{_D}{{3,5}}"),
    ("spaced", rf"\+?{_D}{{2,4}}[- \xa0]{_D}{{2,4}}[- \xa0]{_D}{{3,4}}[- \xa0]?{_D}{{3,5}}"),
    ("spaced", rf"{_D}{{1,4}}[ \xa0-]{_D}{{1,4}}/{_D}{{1,4}}"),
    ("word", _ASCII_DOTTED_TAIL),
    ("word", _DOTTED),
    ("word", _BANG),
    ("raw", rf"{_HOST}(?:\.{_HOST})*\.(?i:com|org|net|edu)"),              # *seen.com
    ("raw", rf"(?:<|&lt;)?[A-Za-z0-9][^{_NOT_IN_EMAIL}]*@"         # e-mail addresses
            rf"[^{_NOT_IN_EMAIL}.]+(?:\.[^{_NOT_IN_EMAIL}.]+)*>?"),
    # an ending abbreviation, with up to two characters of context
    ("ender", rf"(?P<t>{_alternation(_ENDERS)}\.)(?:.|\n){{0,2}}"),
    ("word", rf"\xad+{_PART}"),
    ("word", rf"\xad*{_D}+(?:[.,]{_D}+)+"),                      # 3.5, 1,000, 1.2.3
    ("word", _NUMBER_TAIL),
    ("word", rf"\xad*{_D}+(?:[.,:]{_D}+)+"),                     # 10:30, 5:30:00
    ("word", rf"[.,:]{_D}+(?:[.,:]{_D}+)*"),                     # .5 ,5 :30
    ("word", rf"[-+](?:{_D}+|[.,:]{_D}+)(?:[.,:]{_D}+)*"),       # -5 +2.5
    ("word", _WORD),
    ("word", rf"(?P<t>[A-Za-z\xad]*[A-MO-Za-mo-z])[nN]{_INNER}[tT]"),  # do|n't, ca|n't
    ("word", rf"{_SLASHED}(?:\\?/{_SLASHED}){{1,2}}"),            # and/or, 12/03/2019: 3 parts
    ("word", _NAME),
    ("word", _NAME2),
    ("word", _COMPOUND),
    ("word", _UCOMPOUND),
    ("word", _DOTTED_COMPOUND),
    ("word", rf"{_D}{{1,2}}/{_D}{{1,2}}-{_D}{{2,4}}"),            # 9/11-10
    ("word", rf"{_A}+(?:\.{_A}+)*\.(?i:{'|'.join(_FILE_TYPES)})(?=[\s.,!?]|\Z)"),
    # elisions, word-initial and vowel-final: y'all, J'accuse, ne'er, the'effusion
    ("word", rf"{_L0}+[aeiouyAEIOUY]{_INNER}[aeiouA-Z]{_L0}*"),
    ("word", rf"[dDjJlL]{_APOS}|[yY]{_APOS}(?=[A-Za-z])"),
    ("word", rf"(?i:ma{_APOS}am|dunkin{_APOS}|o{_APOS}clock)"),
    ("word", rf"{_APOS}[nN]{_APOS}|{_APOS}(?i:em|till?|cause)"),  # rock 'n' roll, 'em, 'til
    ("word", rf"{_APOS}[2-9]0[sS]|(?P<t>{_APOS}{_D}{_D})\s"),     # the '90s, in '99
    ("word", r"(?i:c'mon|nat'l|cont'd\.|-[lr][rsc]b-|(?-i:(?!&quot;|&apos;))&(?:quot|apos);)"),
    # a word keeps its period before , ; or : ("normal.," -> "normal." ",")
    *[("word", rf"(?P<t>(?:{shape})\.)[,;:]") for shape in (
        _WORD, _COMPOUND, _UCOMPOUND, _DOTTED_COMPOUND, _NUMBER_TAIL, _DOTTED, _NAME,
        _ASCII_DOTTED_TAIL, _BANG, "[A-Z]+[&+][A-Z]+", rf"\xad+{_PART}")],
    # web addresses: with a scheme, or a host ending in .com .net .org .edu and a path
    ("raw", rf"(?:(?i:https?)://|\w+(?:\.\w+)*\.(?i:com|net|org|edu)/)"
            rf"[^{_NOT_IN_URL}]+[^{_NOT_IN_URL}.,?!-]"),
    ("raw", r"&#[0-9]+;"),                                       # numeric entities stay
    ("raw", rf"#{_L}+"),                                         # #hashtag
    ("word", r"@[A-Za-z_][A-Za-z0-9_]*"),                       # @mention
    ("symbol", r"[A-Z]+[&+][A-Z]+|[A-Z]+\$"),                    # AT&T, US$
    # PTB splits cannot, gonna, gotta, wanna, lemme, gimme, 'tis, 'twas (not before 's)
    *[("split", rf"(?P<t>(?i:{a}))(?P<u>(?i:{b}))(?:[^A-Za-z0-9]|\Z)")
      for a, b in (("can", "not"), ("gon|wan", "na"), ("got", "ta"), ("lem|gim", "me"))],
    ("word", r"(?P<t>'[tT])(?i:is|was)"),
    ("clitic", rf"{_CLITIC}|[nN]{_INNER}[tT]"),
    ("title", rf"{_alternation(_TITLES)}\."),
    ("word", rf"(?P<t>{_alternation(_BEFORE_NUMBERS)}\.)\s?[0-9]"),  # No. 5, Fig.3
    ("acronym", _ACRO),
    ("letter", r"[A-Za-z]\."),                                   # an initial: J. Smith
    ("quote", r"\"|&quot;|&apos;|[`']"),
    ("quote", r"``|''"),
    ("quote", rf"`[{_CURLY}]|[{_CURLY}][{_CURLY}`]?"),
    # smileys keep square and curly brackets as they are: :) :-( ;D =] (x_x) ^_^
    ("smiley", r"(?:[<>]?[:;=][-'o*]?[pPdDO()\[\]{|\\@]|:0?3)(?![A-Za-z0-9])"),
    ("smiley", r"[-^x=<>']_[-^x=<>']|\((?:[-^x=<>']{2}|(?!--|.--)[-^x=<>'][-_.][-^x=<>'])\)"),
    ("symbol", r"\.{3,5}|\. \. \.(?: \.)?|\u2026|\x85"),         # ellipses, as "..."
    ("symbol", r"[?!]+|[.,;:]"),
    ("symbol", r"-{5,}|-{2,4}|[\u2013\u2014\u2015\x96\x97]|&[mn]dash;"),  # dashes, as "--"
    ("symbol", r"[\xb2\xb3\xb9\u2070\u2074-\u2079]+|[\u2080-\u2089]+"),  # runs of ² or ₂
    ("symbol", r"\*+|(?:\\\*)+|#+|@@+|_+|<<|>>"),
    ("symbol", rf"(?i:&amp;|&lt;|&gt;|c\+\+|[cf]#)|[{_SYMBOL_CHARS}]"),
]
_PATTERNS = [(kind, re.compile(p)) for kind, p in _PATTERNS]
# A plain or dotted word's length counts a clitic after it (observed: "Rt.c'mon" is "rt.c" "'"
# "mon", as "rt.c" + "'m" outlasts "Rt." + two characters; "cannot'sx" does not split).
_TAKES_CLITIC = {rx for _, rx in _PATTERNS if rx.pattern in (_WORD, _DOTTED, _BANG)}
_CLITIC_AHEAD = re.compile(rf"{_APOS}(?:[sSdDmM]|[lL][lL]|[rR][eE]|[vV][eE])")

_RENAMED = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
            "&amp;": "&", "&lt;": "<", "&gt;": ">", "\xad": "-", "\u2026": "...", "\x85": "...",
            "\u20ac": "$", "\xa4": "$", "\u20a0": "$", "\x80": "$", "\xa3": "#", "\xa2": "cents",
            "\xbd": "1/2", "\xbc": "1/4", "\xbe": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_QUOTES = {"\u2018": "`", "\u201b": "`", "\x91": "`", "\u2039": "`", "\u2019": "'", "\x92": "'",
           "\u203a": "'", "\u201c": "``", "\x93": "``", "\xab": "``", "\u201d": "''", "\x94": "''",
           "\xbb": "''", "&apos;": "'"}
# After one letter + ".", a capitalised sentence starter or a tag (with a space after it) ends the
# sentence; after an acronym it adds a "." (observed).
_STARTER = re.compile(rf"\s+(?:{_capitalised(_STARTERS)}\s|(?:{_TAG})(?=\s|\Z))")
_SENTENCE_BREAK = re.compile(rf"{_SP}*\n{_SP}*\n|\s+(?:{_TAG})|\s*\Z")
_TO_NEXT_WORD = re.compile(rf"{_SP}*\n?{_SP}*")


def _longest(text, pos):
    """(kind, match) of the pattern that wins at pos, or None."""
    best, best_len = None, 0
    for kind, rx in _PATTERNS:
        m = rx.match(text, pos)
        if m is None:
            continue
        n = m.end() - pos
        if rx in _TAKES_CLITIC:
            ahead = _CLITIC_AHEAD.match(text, m.end())
            n += ahead.end() - m.end() if ahead else 0
        if n > best_len:
            best, best_len = (kind, m), n
    return best


def _ends_sentence(text, pos):
    """After an ending abbreviation: the text ends, a paragraph or a tag follows, or the next word
    (on this line or the next) starts with a capital (observed)."""
    if _SENTENCE_BREAK.match(text, pos):
        return True
    m = _TO_NEXT_WORD.match(text, pos)
    return m.end() < len(text) and text[m.end()].isupper()


def _token(kind, m, tok, text, end):
    """The output tokens of one matched token."""
    if kind == "quote":
        if tok in ('"', "&quot;"):  # PTB: `` opens, '' closes; the jar looks at the next character
            return ["``" if re.match(r"[A-Za-z0-9$]", text[end:end + 1]) else "''"]
        if tok == "'":
            return ["`" if re.match(r"[A-Za-z]\S", text[end:end + 2]) else "'"]
        return ["".join(_QUOTES.get(c, c) for c in _QUOTES.get(tok.lower(), tok))]
    if kind == "clitic":  # 's 're n't ... with their quotes renamed; 'n stays as written
        return [tok.lower() if tok[-1] in "nN" else re.sub("[\u2018\u2019\u201b]|&apos;",
                                                    lambda q: _QUOTES[q.group()], tok).lower()]
    if kind == "split":
        return [tok.lower(), m.group("u").lower()]
    if kind == "ender":
        return [tok.lower()] + (["."] if _ends_sentence(text, end) else [])
    if kind == "letter" and _STARTER.match(text, end):
        return [tok[:-1].lower(), "."]
    if kind == "acronym" and _STARTER.match(text, end):
        return [tok.lower(), "."]
    if kind == "spaced":
        tok = "".join(_RENAMED.get(c, c) for c in tok)
    elif kind == "smiley":
        tok = tok.replace("(", "-lrb-").replace(")", "-rrb-")
    elif kind == "symbol":
        tok = "--" if re.fullmatch(r"-{2,4}|&[mn]dash;|[\u2013\u2014\u2015\x96\x97]", tok) else tok
        if re.fullmatch(r"\.{4,5}|\. \. \.(?: \.)?", tok):
            tok = "..."
        tok = _RENAMED.get(tok.lower(), tok)
    elif kind == "tag" and "\n" in tok and '"' not in tok and "'" not in tok:
        tok = tok.replace("\n", " ")
    elif kind in ("word", "title", "acronym", "letter"):
        tok = tok.replace("\xad", "")  # a soft hyphen is dropped from a word
    return [tok.lower().replace(" ", "\xa0")]   # the jar keeps a token's spaces as U+00A0


def _jar_lines(text):
    """The lines the jar prints for a text, one token after another."""
    lines, pos = [[]], 0
    while pos < len(text):
        m = _NEWLINE.match(text, pos) or _SPACES.match(text, pos)
        if m:
            if m.re is _NEWLINE:
                lines.append([])
            pos = m.end()
            continue
        found = _longest(text, pos)
        if found is None:  # a character the jar cannot tokenise: it deletes it
            pos += 1
            continue
        kind, m = found
        tok = m.group("t") if m.groupdict().get("t") else m.group(0)
        pos = m.end("u") if kind == "split" else pos + len(tok)
        lines[-1] += _token(kind, m, tok, text, pos)
    return "\n".join(" ".join(line) for line in lines).split("\n")


def tokenize_captions(texts):
    """Captions -> one string each: their tokens lower-cased and joined by spaces, punctuation
    dropped, read exactly as pycocoevalcap reads the jar's output for them in one call (so the
    next caption can change the last token of this one: "Segment I." before "The heart.")."""
    # pycocoevalcap replaces "\n" in a caption by a space; the other line breaks that the jar
    # obeys would shift every later caption onto the wrong sample, so they count as spaces too
    lines = _jar_lines("\n".join(_NEWLINE.sub(" ", t) for t in texts))
    if len(lines) < len(texts):
        raise ValueError("a tag spans two captions, so the jar would have merged their lines: "
                         f"{len(texts)} captions gave {len(lines)} lines")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATION)
            for line in lines[:len(texts)]]


def tokenize(text):
    """One caption -> its tokens as tokenize_captions gives them."""
    return tokenize_captions([text])[0]
