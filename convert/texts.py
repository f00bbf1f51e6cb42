"""Japanese text to verify conversions on: a file the user names, or kinoe's own passages.

The bundled passages were written for kinoe (no licence to track) and mix what Japanese
text holds: kanji, hiragana, katakana, full- and half-width digits, Latin words, dialogue
and a chat turn.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from common.errors import KinoeError

BUNDLED_PASSAGES = (
    "富士山は静岡県と山梨県にまたがる活火山で、標高は3776メートルある。"
    "古くから信仰の対象とされ、2013年には世界文化遺産に登録された。",
    "昨日の夕方、駅前の商店街で小さな祭りが開かれた。子どもたちは金魚すくいに夢中になり、"
    "大人たちは焼きそばの屋台に長い列を作っていた。",
    "東京都の人口は約1400万人で、日本の総人口のおよそ11％を占める。"
    "通勤時間帯の電車は非常に混雑し、乗車率が150％を超える路線もある。",
    "「明日は雨が降るらしいよ」と母が言った。「じゃあ、傘を持っていかなきゃね」と私は答え、"
    "玄関に置いてある青い傘を確かめた。",
    "機械学習のモデルを評価するときは、学習に使わなかったデータで性能を測る必要がある。"
    "そうしなければ、モデルが訓練データを暗記しているだけかどうか分からない。",
    "京都には千年以上の歴史を持つ寺社が数多く残っている。清水寺や金閣寺には、"
    "季節を問わず国内外から多くの観光客が訪れる。",
    "<|im_start|>user\n日本で一番長い川は何ですか？<|im_end|>\n"
    "<|im_start|>assistant\n日本で一番長い川は信濃川で、長さは約367キロメートルです。<|im_end|>\n",
    "味噌汁の作り方：鍋に水と昆布を入れて火にかけ、沸騰する直前に昆布を取り出す。"
    "かつお節を加えてだしを取り、豆腐とわかめを入れてから味噌を溶かす。",
    "ソフトウェア開発では、バージョン管理システムのGitが広く使われている。"
    "変更の履歴を残せるので、問題が起きたときに以前の状態へ戻すことができる。",
    "春になると、各地で桜の開花予想が発表される。満開の桜の下で花見をするのは、"
    "日本の春の代表的な風景の一つだ。",
)


def load_texts(path: Path | None, documents: int) -> list[str]:
    """The first ``documents`` non-empty texts of ``path`` (.jsonl[.gz] 'text' fields, or .txt lines)."""
    if path is None:
        return list(BUNDLED_PASSAGES[:documents])
    path = Path(path)
    if not path.is_file():
        raise KinoeError(f"verify.text = {path} does not exist; fix verify.text in the config")
    texts: list[str] = []
    opener = gzip.open if path.name.endswith(".gz") else open
    jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if jsonl and line.strip():
                    try:
                        text = json.loads(line).get("text", "")
                    except (ValueError, AttributeError):
                        raise KinoeError(
                            f"verify.text = {path}: line {number} is not a JSON object"
                        ) from None
                else:
                    text = line.rstrip("\n")
                if isinstance(text, str) and text.strip():
                    texts.append(text)
                    if len(texts) == documents:
                        break
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise KinoeError(f"verify.text = {path}: unreadable ({error})") from None
    if not texts:
        raise KinoeError(f"verify.text = {path} holds no non-empty text")
    return texts
