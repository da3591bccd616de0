"""Report-like sentences for checking `nlg.nlg_tokenize` against pycocoevalcap's java PTBTokenizer.

`report_sentences(seed, n)` is deterministic (its own random.Random). `python tests/ptb_cases.py`
runs the jar (through pycocoevalcap's PTBTokenizer, exactly as COCOEvalCap does) on
report_sentences(0, N_CASES) and stores the sentences and the jar's output lines in
tests/data/ptb_tokenizer_cases.json, which tests/test_metrics.py compares with when java is absent.
"""

import json
import os
import random

N_CASES = 2000
N_PAIRS = 300
FIXTURE = os.path.join(os.path.dirname(__file__), "data", "ptb_tokenizer_cases.json")

_WORDS = ("the heart size is normal no focal consolidation pleural effusion or pneumothorax "
          "mediastinal contours are unremarkable lungs clear ET tube tip NG PICC line SVC right "
          "left lower lobe atelectasis mild severe interval change compared to prior study AP PA "
          "lateral portable x-ray CXR chest there is seen with without evidence of acute "
          "cardiopulmonary process findings impression stable moderate small large opacity "
          "opacities bibasilar retrocardiac hilar aortic knob calcified tortuous degenerative "
          "spine osseous structures intact sternotomy wires clips cardiomegaly edema vascular "
          "congestion hemidiaphragm costophrenic angle blunting I A a").split()
_ABBREVIATIONS = ("e.g. i.e. Dr. Dr A.P. P.A. p.o. q.d. b.i.d. vs. vs etc. approx. Rt. Lt. St. Mr. "
                  "Mrs. Jan. Sept. Feb. Mass. Pa. PA. Co. Inc. No. no. Nos. Fig. fig. Figs. ca. "
                  "pp. op. Art. Bldg. U.S. a.m. p.m. A.M. P.M. Ph.D. M.D. Jr. Sr. cm. mm. pt. Pt. "
                  "Pts. hx. Hx. s/p S/P c/w w/o w/ and/or r/o h/o y/o T. L. R. I. II. IV. IVC. "
                  "Ave. Calif. Ill. ill. Ore. Tex. Wash. wash. Mt. Ft. Gen. Col. col. Sen. Capt. "
                  "cf. Co.Ltd Pty. Pte. Ltd. est. ext. tel. sq. al. et al. seq. Bros.").split()
_TAGS = ("<BR>", "<br>", "<br/>", "<br />", "</p>", "<p>", "<XXXX>", "XXXX", "xxxx", "<XXXX>.",
         "[XXXX]", "(XXXX)", "___", "__", "_", "<b>", "</b>", "<i>bold</i>", "<p class='x'>",
         "<a href=\"x\">", "<!-- c -->", "< 5", "<5", ">5", "> 5", "<=", ">=", "<->", "<<", ">>",
         "->", "=>", "<<<", "<a>b", "<1cm")
_UNITS = ("mm", "cm", "%", "mL", "ml", "cc", "mg", "kg", "Hz", "bpm", "cmH2O", "mmHg", "°", "°C",
          "degrees", "µg", "x", "L", "HU", "mSv", "Gy")
_SYMBOLS = ("&", "&amp;", "+", "+/-", "±", "=", "~", "^", "*", "**", "#", "#2", "@", "$", "$5",
            "€5", "£", "¢", "§", "|", "\\", "/", "//", "•", "·", "→", "×", "÷", "≥",
            "≤", "½", "¼", "¾", "⅓", "²", "³", "₂", "µ", "é", "café", "naïve",
            "Ångström", "Ölfleck", "ß", "ø", "–", "—", "―", "‐", "‑", "…",
            "\u00ad", "\u200b", "\ufeff", "\x85", "\t", "\xa0", "\u3000", "®", "©", "™", "™.",
            "%", "%.", "(", ")", "[", "]", "{", "}", ":-)", ":)", ";)", ":(", ":D", "=)", "x_x",
            "^_^", "(x_x)", "o_o", "-_-")
_QUOTES = ('"', "'", "`", "``", "''", "\u201c", "\u201d", "\u2018", "\u2019", "\u201e", "\u00ab",
           "\u00bb", "\u2039", "\u203a", "&quot;", "&apos;")
_CLITICS = ("patient's", "patients'", "don't", "doesn't", "isn't", "can't", "won't", "cannot",
            "CANNOT", "it's", "there's", "we're", "I'm", "they've", "she'll", "he'd", "o'clock",
            "O'Brien", "d'Alembert", "l'hôpital", "patient’s", "don’t", "isn’t", "it’s",
            "y'all", "'em", "'til", "'90s", "'99", "rock'n'roll", "ma'am", "gonna", "wanna",
            "gotta", "lemme", "gimme", "'tis", "'twas", "c'mon", "cont'd", "nat'l", "Dunkin'",
            "n't", "'s", "Crohn's", "Graves'", "Parkinson's", "Hodgkin's", "Barrett's", "'s.", "s'",
            "it's.")
_NUMBERS = ("{a}", "{a}.{b}", "{a},{b}00", "{a}:{b}5", "{a}.{b}-{b}.{a}", "{a}-{c}", "{a} - {c}",
            "{a}–{c}", "{a}—{c}", "{a}/{c}", "{b}/{c}/2019", "{b}/{c}/19", "{b}-{c}-2019",
            "{a}/{b}/{c}", "2019-0{b}-1{a}", "{a}.{b}.{c}", "{a}x{c}", "{a} x {c}",
            "{a}.{b} x {c}.{a}", "{a}x{c}x{b}", "{a}.{b}x{c}.{a}", "-{a}", "+{a}", "({a})", "{a})",
            "{a}.", "{a}.{b}.", "{a}th", "{a}st", "{a}nd", "#{a}", "No.{a}", "{a}%", "{a}.{b}%",
            "{a}+", "{a}-{b}%", "{a}:{b}0 am", "{a}:{b}0am", "{a}:{b}0 p.m.", "{a}:{b}0:00",
            "{a} {b}/{c}", "{a}-{b}/{c}", "{a}''", "{a}'", "{a}°", "{a}.{b}cm", "{a}cm.", "{a}mm,",
            "T{a}", "T{a}-T{c}", "C{a}-{c}", "L{a}/L{c}", "{a}-year-old", "{a}-cm", "{a}.{b}-cm",
            "{a}F", "{a}Fr", "{a} Fr.", "{b}{a}{c}-{a}{b}{c}{a}",
            "({a}{b}{c}) {c}{a}{b}-{a}{b}{c}{a}", "{a}{b}{c}.{b}{c}{a}.{a}{b}{c}{a}",
            "{a}{b}{c} {c}{a}{b} {a}{b}{c}{a}", "{a}{b}{c}-{c}{a}{b}-{a}{b}{c}{a}", "{a}.{b}e-{c}",
            "0.{b}", ".{b}", "{a},{b}", "{a}:{b}", "{a}:1", "1:{a}", "{a}/10", "{a}/{b}0", "1/2",
            "I-{a}", "{a}.Severe")
_LIST_MARKERS = ("{n}.", "{n}.", "{n}. ", "{n})", "({n})", "{n}-", "{n}:", "#{n}", "{n}/", "{l}.",
                 "{l})", "({l})", "{L}.", "{L})", "-", "*", "•", "- ", "--")
_PUNCT_AFTER = ("", "", "", "", "", ".", ".", ".", ",", ",", ":", ";", "?", "!", "...",
                "..", "....", ". . .", "?!", "!!", ").", ")", "),", ".)", ",)", ".,", ".;",
                ".:", "-", "--", "---", "'", "\"", "\u201d", "\u2019", "/", "/.", "%", "%.",
                "'s", "]", "}.", ":)")
_PUNCT_BEFORE = ("", "", "", "", "", "", "(", "[", "{", "\"", "'", "\u201c", "\u2018", "`", "``",
                 "-", "--", "/", "...", "<", "*", "#", "@")


def _pick(rng, options):
    return options[rng.randrange(len(options))]


def _number(rng):
    a, b, c = rng.randint(0, 20), rng.randint(0, 9), rng.randint(1, 12)
    return _pick(rng, _NUMBERS).format(a=a, b=b, c=c)


def _item(rng):
    """One whitespace-free (mostly) piece of report text."""
    r = rng.random()
    if r < 0.45:
        w = _pick(rng, _WORDS)
    elif r < 0.58:
        w = _pick(rng, _ABBREVIATIONS)
    elif r < 0.70:
        w = _number(rng) + _pick(rng, ("", "", " ", "")) + (_pick(rng, _UNITS)
                                                            if rng.random() < 0.4 else "")
    elif r < 0.77:
        w = _pick(rng, _TAGS)
    elif r < 0.85:
        w = _pick(rng, _SYMBOLS)
    elif r < 0.92:
        w = _pick(rng, _CLITICS)
    elif r < 0.96:
        w = _pick(rng, _QUOTES) + _pick(rng, _WORDS) + _pick(rng, _QUOTES)
    else:  # two words glued by a symbol: lungs/heart, x-ray, normal.The, heart,lungs
        w = _pick(rng, _WORDS) + _pick(rng, "-/.,:;_+&=@'\u2019*") + _pick(rng, _WORDS)
    case = rng.random()
    w = w.upper() if case < 0.12 else w.capitalize() if case < 0.3 else w
    if rng.random() < 0.25:
        w = _pick(rng, _PUNCT_BEFORE) + w
    if rng.random() < 0.35:
        w = w + _pick(rng, _PUNCT_AFTER)
    return w


def report_sentences(seed, n):
    """n report-like lines with list numbers touching words ("2.No"), tags, numbers, units, dates,
    abbreviations, quotes, clitics, ellipses, non-ASCII, odd spacing, glued punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 18)):
            # a list marker, often glued to the next word: "2.No evidence", "1)Severe"
            if rng.random() < 0.12:
                parts.append(_pick(rng, _LIST_MARKERS).format(n=rng.randint(1, 12),
                                                              l=_pick(rng, "abcdxyz"),
                                                              L=_pick(rng, "ABCDIVX")))
                if rng.random() < 0.6:
                    parts[-1] += _item(rng)
                    continue
            parts.append(_item(rng))
        sep = [_pick(rng, (" ", " ", " ", " ", " ", "  ", "   ", "", "\t", " \xa0")) for _ in parts]
        line = "".join(p + s for p, s in zip(parts, sep)).rstrip(" ")
        if rng.random() < 0.15:
            line = " " * rng.randint(1, 3) + line
        lines.append(line)
    return lines


_FINDINGS = (
    "The heart size is normal.", "Heart size is mildly enlarged, unchanged.",
    "Moderate cardiomegaly is stable.", "No focal consolidation, pleural effusion or pneumothorax.",
    "There is no pneumothorax.", "No pneumothorax.", "Lungs are clear.",
    "The lungs are hyperinflated, consistent with COPD.", "Mild pulmonary vascular congestion.",
    "Small bilateral pleural effusions, left greater than right.", "Bibasilar atelectasis.",
    "ET tube tip is 4.5 cm above the carina.", "ETT terminates 3cm above the carina.",
    "NG tube tip in the stomach.", "Right PICC line tip at the cavoatrial junction.",
    "Left-sided Port-A-Cath tip in the SVC.",
    "There is a 5 mm nodule in the right upper lobe (series 3, image 45).",
    "Degenerative changes of the T-spine.", "Median sternotomy wires and CABG clips are intact.",
    "s/p CABG.", "Compared to prior study from 12/03/2019.",
    "Findings were discussed with Dr. XXXX at 10:30 a.m. on XXXX.",
    "Opacity at the left base, e.g., pneumonia.",
    "Calcified granuloma, i.e. old granulomatous disease.",
    "Retrocardiac opacity could reflect atelectasis vs. pneumonia.",
    "The patient's 2nd exam today.", "Don't see an effusion.",
    "AP portable upright view of the chest.", "PA and lateral views of the chest.",
    "Mediastinal contours are within normal limits.", "XXXX XXXX are intact.",
    "Increased opacity in the right lower lobe, ~10% larger.",
    "Cardiomediastinal silhouette is unremarkable.", "Osseous structures are unremarkable.",
    "No acute cardiopulmonary process.", "Left basilar opacity -- likely atelectasis.",
    "Hyperexpanded lungs... no acute process.", "Aorta is tortuous and calcified.",
    "Elevated R. hemidiaphragm.", "Chronic blunting of the left costophrenic angle.",
    "Interval removal of the ET tube.", "\u201cStable\u201d appearance of the chest.",
    "Nodule measures 1.5-2.0 cm; previously 1.2 cm.", "Temp 38\u00b0C, dose 5 \u00b5g.",
    "Cardiac silhouette \u2013 normal.", "Fracture of the 5th-7th ribs.")
_GLUE = (" ", " ", " ", "  ", "<BR>", " <BR> ", "<br>", "\n", " <XXXX> ")


def _report(rng, sentences):
    """Sentences joined as in real reports: spaces, <BR> tags, numbered lists with
    the number touching the word."""
    numbered = rng.random() < 0.4
    parts = []
    for i, s in enumerate(sentences):
        if numbered:
            s = _pick(rng, ("{n}.{s}", "{n}. {s}", "{n}){s}", "{n}.  {s}")).format(n=i + 1, s=s)
        parts.append(s)
    text = parts[0]
    for p in parts[1:]:
        text += _pick(rng, _GLUE) + p
    return text


def report_pairs(seed, n):
    """n (references, hypothesis) pairs of report-like text: the hypothesis shares some
    sentences with a reference."""
    rng = random.Random(seed)
    refs, hyps = {}, {}
    for i in range(n):
        ref = [_pick(rng, _FINDINGS) for _ in range(rng.randint(1, 6))]
        hyp = [s for s in ref if rng.random() < 0.6] + [_pick(rng, _FINDINGS)
                                                        for _ in range(rng.randint(0, 3))]
        hyp = hyp or [_pick(rng, _FINDINGS)]
        rng.shuffle(hyp)
        refs[f"r{i}"] = [_report(rng, ref)] + ([_report(rng, ref[::-1])]
                                               if rng.random() < 0.3 else [])
        hyps[f"r{i}"] = _report(rng, hyp)
    return refs, hyps


def coco_tokenize(refs, hyps):
    """Tokenise as COCOEvalCap does: all references in one PTBTokenizer
    call, all hypotheses in another."""
    ids = list(refs)
    flat = iter(jar_tokenize([r for k in ids for r in refs[k]]))
    return ({k: [next(flat) for _ in refs[k]] for k in ids},
            dict(zip(ids, jar_tokenize([hyps[k] for k in ids]))))


def jar_tokenize(texts):
    """pycocoevalcap's PTBTokenizer on the texts in one call (one caption
    each, in order): needs java."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    out = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return [out[i][0] for i in range(len(texts))]


def write_fixture():
    sentences = report_sentences(0, N_CASES)
    refs, hyps = report_pairs(0, N_PAIRS)
    jar_refs, jar_hyps = coco_tokenize(refs, hyps)
    fixture = {"generator": "tests/ptb_cases.py: report_sentences(0, N_CASES), "
                            "report_pairs(0, N_PAIRS)",
               "tokenizer": "pycocoevalcap 1.2 PTBTokenizer (stanford-corenlp-3.4.1.jar, "
                            "-preserveLines -lowerCase, punctuation removed)",
               "sentences": [[s, j] for s, j in zip(sentences, jar_tokenize(sentences))],
               "pairs": [[k, refs[k], hyps[k], jar_refs[k], jar_hyps[k]] for k in refs]}
    # one case a line, so that a change to the generator or the jar shows as a readable diff
    with open(FIXTURE, "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: " + (
            "[\n" + ",\n".join(json.dumps(c) for c in v) + "\n]"
            if isinstance(v, list) else json.dumps(v))
            for k, v in fixture.items()) + "\n}\n")
    print(f"wrote {len(sentences)} sentences and {len(refs)} report pairs to {FIXTURE}")


if __name__ == "__main__":
    write_fixture()
