"""A self-generated movie-review corpus and its BPE tokenizer: the sentiment experiment's
"small" configuration, with no download.

Each review is about one made-up film (title, year, genre, director, two actors and their
roles, setting, plot) and is written by a compositional grammar. The reviewer's rating
(1-10, drawn with IMDb's U shape: many 1s and 10s) sets the tone ("negative" 1-4, "mixed"
5-6, "positive" 7-10: IMDb's labelling rule, with the middle kept) and, sentence by
sentence, the odds and strength of praise versus criticism. A review is 2-6 sentences: an
opening (the film, its maker, how the reviewer came to see it), a plot summary, remarks on
aspects (acting, direction, writing, music, visuals, pacing) and on the whole film,
reactions, asides, production notes, comparisons with other made-up films, a
recommendation and a verdict.
Remarks come from many frames (copulas, verbs, "I loved ...", "... had me in tears",
evaluative nouns, aspect idioms such as "the dialogue crackles", negated opposites such as
"never boring" or "hardly convincing", hedges, intensifiers, contrasts with "but" /
"although" / "yet" / "though"), over lexicons graded by valence (strong and mild, positive
and negative, general and aspect-specific) and neutral descriptive words. Mixed reviews set
praise against criticism; one-sided reviews sometimes concede a flaw or a bright spot.
Punctuation varies ("!", "...", ";", " - ", questions, quoted titles, "7/10"); some
reviewers write contractions ("isn't", "I'd"), a few all in lowercase.

What it is not: IMDb. Real reviews are longer (about 230 words on average against 38
here), wander off topic, quote dialogue, misspell, use slang, markup and sarcasm, and
discuss real films and people. Here every sentence is grammatical and on topic, the
vocabulary is closed (about 2,000 word types in 20,000 reviews, against IMDb's 100,000+),
and a review's sentiment is whatever its rating asked for. VADER, the small configuration's
reward, reads it roughly as a reader would but not exactly (it scores "steals the show" as
negative and "do not bother" as positive, and knows neither "wooden" nor "contrived"): on
the first 6,000 reviews of seed 0 the mean compound score is +0.47 for positive, +0.23 for
mixed and -0.21 for negative reviews (correlation with the rating 0.53), spread over the
whole of [-1, 1] (2% beyond +-0.95). It keeps what the DPO paper's experiment needs:
prefixes that leave the continuation's sentiment open, a spread of rewards, and enough
variety that a small model must learn a distribution, not a list (20,000 reviews hold
about 80,000 sentences, 63,000 of them distinct; 49% positive, 36% negative, 15% mixed).

Records use the SFT format of `dpo_jax.data.formats`: `{"prompt": "", "completion": text}`,
plus the generator's `rating` and `tone` (which the readers ignore; kept for analysis).

`write_review_tokenizer` trains a byte-level BPE tokenizer (GPT-2's pre-tokenization, so
any split of a text at token boundaries decodes back to the exact text) with the specials
and Llama-style BOS of `dpo_jax.data.synthetic`. With 2,048 tokens trained on 6,000
reviews, a held-out review is 60 tokens on average (3.6 characters a token; 0.3% of reviews
are longer than 127 tokens).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Sequence

from dpo_jax.data.synthetic import (
    SPECIAL_TOKENS,
    save_tokenizer,
    write_jsonl,
)

TONES = ("positive", "negative", "mixed")
# IMDb's rating histogram is U-shaped (10 and 1 are the most common ratings).
RATING_WEIGHTS = {1: 14, 2: 7, 3: 7, 4: 8, 5: 7, 6: 8, 7: 10, 8: 12, 9: 10, 10: 17}


@dataclasses.dataclass(frozen=True)
class Review:
    """One generated review: its text, the rating (1-10) the generator wrote it for, and
    the tone that rating implies ("negative" 1-4, "mixed" 5-6, "positive" 7-10)."""

    text: str
    rating: int
    tone: str


def tone_of(rating: int) -> str:
    """IMDb's labelling rule (<= 4 negative, >= 7 positive), with 5-6 kept as "mixed"."""
    return "negative" if rating <= 4 else "mixed" if rating <= 6 else "positive"


def _w(text: str) -> tuple[str, ...]:
    return tuple(text.split("|"))


def _verbs(text: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(forms.split("/")) for forms in text.split("|"))


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _one(rng: random.Random, options: str) -> str:
    return rng.choice(options.split("|"))


# ----------------------------------------------------------------------------- lexicons

FIRST = _w(
    "Ada|Alma|Anton|Ari|Beatrix|Bruno|Cal|Camille|Cyrus|Dalia|Dev|Edith|Elio|Esme|Felix|"
    "Flora|Gideon|Greta|Hal|Hana|Ines|Ivo|Jonah|June|Kasimir|Kit|Lena|Leopold|Lior|Mabel|"
    "Marek|Mira|Nadia|Nico|Odile|Omar|Petra|Quentin|Rafe|Rosa|Saul|Selma|Soren|Tamsin|Theo|"
    "Ulla|Vera|Viktor|Wren|Yusuf|Zelda|Zora|Agnes|Bram|Clio|Dmitri|Eun|Farida|Gus|Hugo|Isolde|"
    "Jarek|Kiri|Lucia|Matteo|Noor|Oskar|Paloma|Rhea|Stellan|Tova|Umar|Valentin|Wanda|Xavier|Yara|"
    "Aurelio|Bettina|Cosmo|Delphine|Emeric|Fenna"
)
LAST = _w(
    "Abernathy|Alvarez|Brandt|Castellane|Dunmore|Ekdahl|Falconer|Ferro|Galloway|Hadley|"
    "Halvorsen|Ibsen|Jankowski|Kessler|Laine|Lindqvist|Marchetti|Morrow|Nakamura|Novak|"
    "Okafor|Ortega|Pellham|Quarry|Ravel|Rourke|Salgado|Sandoval|Szabo|Tanaka|Thorne|Ulrich|"
    "Vance|Varga|Whitlock|Winslow|Yardley|Zamora|Blackwood|Coutinho|Delacroix|Eastman|"
    "Fairbanks|Greer|Holloway|Iverson|Kowalski|Lachance|Mbeki|Osei|Ashgrove|Bellweather|Cardoso|"
    "Dragomir|Esterhazy|Fontaine|Grunwald|Haddad|Ilves|Jovanovic|Kristof|Lunde|Moreau|Nilsen|"
    "Oyelaran|Petrakis|Quint|Rasmussen|Strand|Tavares|Underhill|Voss|Wakefield|Xu|Yilmaz|Zeller"
)
TITLE_ADJ = _w(
    "Silent|Last|Crimson|Hollow|Distant|Quiet|Golden|Iron|Midnight|Paper|Glass|Winter|"
    "Northern|Velvet|Seventh|Long|Empty|Burning|Hidden|Salt|Copper|Amber|Narrow|Blue|Wild|"
    "Second|Pale|Far|Little|Summer|Broken|Secret|Sleeping|Crooked|Lonely|Hungry|Frozen|Painted|"
    "Restless|Sunken|Electric|Borrowed|Marble|Scarlet|Drowned|Lucky|Stolen|Eastern|Open|Red"
)
TITLE_NOUN = _w(
    "Harbor|Orchard|Frontier|Witness|Lantern|Signal|Garden|Shore|Machine|Kingdom|Road|River|"
    "Hour|Station|Season|Echo|Border|Archive|Tide|Mountain|Island|Letter|Compass|Engine|"
    "Carnival|Lighthouse|Orbit|Canyon|Ballroom|Parade|Meridian|Harvest|Circuit|Market|Cathedral|"
    "Ferry|Violin|Chorus|Forest|Winter|Summer|Mirror|Bridge|Desert|Paradise|Hotel|Factory|Comet|"
    "Monsoon|Avenue|Alibi|Saint|Ghost|Crossing|Horizon|Quarry|Tower"
)
GENRES = _w(
    "thriller|romantic comedy|western|horror film|documentary|heist movie|family drama|"
    "science fiction film|war film|musical|coming-of-age story|animated feature|crime drama|"
    "mystery|period piece|satire|road movie|courtroom drama|ghost story|sports drama|"
    "spy thriller|disaster movie|biopic|fantasy adventure|psychological thriller|black comedy|"
    "slasher|costume drama|space opera|film noir|buddy comedy|monster movie|political thriller|"
    "dance film|mockumentary|historical epic|teen comedy|martial arts film|survival thriller|"
    "time-travel story|chamber piece|legal thriller|creature feature|animated musical"
)
ROLES = _w(
    "a retired boxer|a young nurse|a small-town sheriff|a disillusioned teacher|"
    "a reclusive painter|an ambitious lawyer|a widowed farmer|a jazz pianist|"
    "a rookie detective|a ship's cook|a bored accountant|a former spy|a teenage runaway|"
    "a stubborn journalist|an aging rock star|a night-shift taxi driver|a country doctor|"
    "a struggling novelist|a chess prodigy|a lighthouse keeper|an out-of-work actor|"
    "a grieving father|a con artist|a marine biologist|a hotel concierge|a union organizer|"
    "a factory worker|a schoolgirl|a lonely astronaut|a translator|a burned-out surgeon|"
    "a small-time magician|an immigrant baker|a disgraced politician|a shy librarian|"
    "a former child star|a cattle rancher|a wedding photographer|a ghostwriter|"
    "an insurance investigator|a mountain guide|a retired judge|a street musician|"
    "a fading opera singer|a fisherman's widow|a cynical war reporter|a college dropout|"
    "a hospice nurse|a hotel maid|a car thief|a mapmaker|a beekeeper|a stand-up comedian|"
    "a prison guard|a ferry captain|a piano tuner|a forger|a park ranger|a radio host|"
    "an antiques dealer"
)
GOALS = _w(
    "has to find her missing brother|tries to keep the family farm|returns home after twenty "
    "years|falls for a rival chef|plans one last robbery|learns a secret about his father|"
    "is followed by a stranger|enters a national baking contest|takes a job at a remote "
    "observatory|inherits a crumbling hotel|coaches a hopeless hockey team|tries to clear "
    "her name|travels across the country with a dog|joins a traveling circus|investigates a "
    "string of fires|builds a boat to cross the sea|agrees to fake an engagement|goes "
    "undercover in a cult|runs for mayor|searches for a lost recording|hides a fugitive in "
    "the attic|competes in a dance marathon|tries to stop a corporate takeover|opens a "
    "restaurant with an old friend|wakes up with no memory|writes letters to a prisoner|"
    "smuggles books across the border|trains for a mountain climb|moves in with a "
    "difficult grandmother|starts a pirate radio station|sets out to find his birth mother|"
    "must deliver a mysterious package|fakes his own death|hunts for a buried fortune|"
    "tries to win back his ex-wife|discovers a body in the lake|takes over a failing newspaper|"
    "teaches music at a prison|is haunted by a childhood friend|runs a rescue on a frozen lake|"
    "agrees to babysit a gangster's son|gets stuck in a time loop|organizes a strike at the mill|"
    "tracks a wolf across the valley|tries to save a closing cinema|"
    "forms a band with three strangers|sails around the world alone|"
    "loses everything in a card game|adopts a stray circus bear|"
    "uncovers a plot inside the city council|falls asleep and wakes up in 1955|"
    "drives a stolen hearse to the coast|sets up a detective agency|"
    "returns to the island where her sister vanished|testifies against her own family|"
    "builds a robot for the science fair|walks the length of the country|"
    "trades places with a lookalike|opens a bookshop in a ghost town|"
    "tries to finish his late father's symphony"
)
SETTINGS = _w(
    "a small fishing town|1970s Chicago|a space station|post-war Vienna|the Scottish "
    "Highlands|a Texas border town|a Paris suburb|a snowed-in motel|Lagos in the 1990s|a "
    "desert mining camp|an island off Norway|a boarding school|a Tokyo office tower|a "
    "riverboat|the near future|a dying seaside resort|a Montreal winter|Depression-era Ohio|"
    "a remote research base|a crowded hospital|a Welsh mining village|1960s Havana|"
    "a generation ship|medieval Prague|a Louisiana bayou|a Berlin nightclub|a lighthouse island|"
    "a Mumbai film studio|an Alaskan cannery|a Swiss sanatorium|a New Jersey diner|colonial Java|"
    "a Siberian train|a floating city|the Roman Empire|a Brooklyn brownstone|"
    "a frozen Arctic outpost|a vineyard in Chile|a 1980s shopping mall|an abandoned theme park"
)
PLACES = _w(
    "at a festival|on a long flight|with my family|on a rainy Sunday|at a late-night "
    "screening|on a whim|with a group of friends|on my laptop|at the local cinema|after "
    "reading the book|on opening night|with my kids|on a first date|at a drive-in|"
    "on a Tuesday matinee|at a sold-out premiere|on an old DVD|on a plane with bad headphones|"
    "at my grandmother's house|during a snowstorm|at a film club|on a train|in an empty theater|"
    "at a midnight show"
)

# Aspects: subject phrases, marked plural with a trailing "*"; {lead}, {support},
# {director}, {role} are filled from the film.
SUBJECTS = {
    "acting": _w(
        "the acting|the cast|the performances*|the ensemble|{lead}|{support}|{lead}'s "
        "performance|the supporting cast|the chemistry between the leads|{support} as "
        "{role2}|{lead} as {role}|the child actors*|the villain|the young lead|the narrator|"
        "the voice cast*|the henchmen*|the two leads*|the cameo by {name}|{support}'s sidekick"
    ),
    "direction": _w(
        "the direction|{director}'s direction|the staging|the filmmaking|{director}|the "
        "editing|the tone|the action scenes*|the big set pieces*|the framing|the long takes*|"
        "the fight choreography|the camera movement|the handling of the big reveal|"
        "the crowd scenes*|the mood"
    ),
    "writing": _w(
        "the script|the screenplay|the dialogue|the writing|the story|the plot|the "
        "characters*|the ending|the twist|the humor|the jokes*|the premise|the central "
        "mystery|the romance|the backstory|the subplot|the first act|the monologues*|"
        "the flashbacks*|the narration|the message|the satire|the world-building|"
        "the third-act reveal|the love triangle|the villain's motives*|the one-liners*"
    ),
    "music": _w(
        "the score|the soundtrack|the music|the sound design|the songs*|the theme|the "
        "musical numbers*|the opening song|the choir|the needle drops*|the main theme|"
        "the piano score|the dance numbers*|the title song"
    ),
    "visuals": _w(
        "the cinematography|the photography|the visuals*|the special effects*|the production "
        "design|the costumes*|the camera work|the set design|the lighting|the locations*|the "
        "color palette|the makeup|the creature design|the CGI|the animation|the aerial shots*|"
        "the stunts*|the production values*|the period detail|the framing of the landscapes*"
    ),
    "pacing": _w(
        "the pacing|the first hour|the second half|the middle act|the running time|the final "
        "act|the opening scene|the climax|the last twenty minutes*|the build-up|"
        "the opening twenty minutes*|the epilogue|the training montage|the chase sequence|"
        "the last act|the slow burn|the rhythm of the edit"
    ),
    # The film as a whole.
    "overall": _w("the film|this movie|it|{title}|the whole thing|this one|the movie"),
}
ASPECTS = tuple(SUBJECTS)
# Aspects that are parts of a film (a concession or a list names a part, not the whole).
PARTS = tuple(a for a in ASPECTS if a != "overall")

# Adjectives by valence: +2 strong praise, +1 mild praise, -1 mild, -2 strong criticism.
GENERAL = {
    2: _w(
        "brilliant|superb|outstanding|magnificent|extraordinary|wonderful|excellent|fantastic|"
        "amazing|stunning|remarkable|terrific|marvelous|flawless|masterful|great|breathtaking|"
        "awesome|delightful|glorious|perfect|impressive|powerful|exquisite|spectacular|astonishing|"
        "spellbinding|sensational|first-rate|top-notch|unforgettable|superlative|splendid|"
        "beautiful|inspired"
    ),
    1: _w(
        "good|solid|decent|fine|nice|pleasant|charming|likable|engaging|enjoyable|effective|"
        "competent|capable|respectable|thoughtful|lovely|warm|sincere|fun|clever|appealing|"
        "confident|satisfying|polished|sweet|entertaining|worthwhile|agreeable|graceful|tender|"
        "handsome|neat|crisp|smooth|genial|spirited|affecting|interesting|admirable|welcome|"
        "promising"
    ),
    -1: _w(
        "weak|flat|bland|dull|uneven|clumsy|forgettable|tedious|awkward|predictable|tired|lazy|"
        "muddled|disappointing|underwhelming|messy|lackluster|unfocused|poor|frustrating|dumb|"
        "dreary|feeble|flawed|mediocre|boring|stale|generic|hackneyed|derivative|overlong|joyless|"
        "limp|overstuffed|toothless|listless|formulaic|sad|annoying|silly|irritating"
    ),
    -2: _w(
        "terrible|awful|dreadful|horrible|atrocious|abysmal|painful|unbearable|pathetic|bad|"
        "embarrassing|disastrous|insufferable|horrendous|dismal|lousy|miserable|ridiculous|"
        "incompetent|idiotic|worthless|excruciating|pitiful|insulting|inept|unwatchable|amateurish|"
        "shambolic|putrid|catastrophic|hateful|offensive|stupid|agonizing|woeful|appalling"
    ),
}
SPECIFIC = {
    "acting": {
        1: _w(
            "convincing|nuanced|natural|believable|magnetic|committed|moving|heartfelt|"
            "understated|fearless|layered|charismatic|touching|luminous|"
            "warm|restrained|electric|endearing"
        ),
        -1: _w(
            "wooden|unconvincing|hammy|overwrought|stilted|one-note|bored|miscast|forced|"
            "shrill|lifeless|annoying|weak|lousy|bad|mannered|awkward"
        ),
    },
    "direction": {
        1: _w("assured|inventive|controlled|bold|elegant|precise|imaginative|ambitious|sure"),
        -1: _w(
            "heavy-handed|aimless|confused|pretentious|self-indulgent|timid|chaotic|lazy|careless"
        ),
    },
    "writing": {
        1: _w(
            "witty|sharp|smart|intelligent|funny|poignant|gripping|original|surprising|tight|"
            "honest|hilarious|insightful|fresh"
        ),
        -1: _w(
            "contrived|cliched|silly|confusing|incoherent|preachy|stupid|lame|cheesy|"
            "nonsensical|pointless|boring|unfunny|far-fetched|dumb|bad|confused"
        ),
    },
    "music": {
        1: _w("haunting|rousing|memorable|lush|evocative|beautiful|catchy|gorgeous|stirring"),
        -1: _w("intrusive|overbearing|generic|syrupy|repetitive|annoying|grating|irritating|bad"),
    },
    "visuals": {
        1: _w("gorgeous|beautiful|striking|lush|vivid|elegant|immersive|inventive|lovely"),
        -1: _w("murky|cheap|ugly|garish|shaky|dated|drab|chaotic|cheap-looking|poor"),
    },
    "pacing": {
        1: _w("brisk|tight|gripping|tense|thrilling|exciting|riveting|lively|efficient"),
        -1: _w("sluggish|slow|bloated|plodding|rushed|exhausting|endless|boring|tedious|dull"),
    },
    "overall": {
        1: _w("watchable|heartwarming|uplifting|absorbing|rewarding|memorable|moving|timely"),
        -1: _w("pointless|unwatchable|overrated|boring|depressing|forgettable|exhausting|dull"),
    },
}
STRONG = _w("truly|incredibly|extremely|absolutely|remarkably|genuinely|utterly|simply|so")
HEDGE = _w("quite|rather|fairly|somewhat|mostly|largely|a little|a bit|kind of|at times")
# (singular present, plural present, past) verb phrases that praise or criticise.
VERBS = {
    1: _verbs(
        "shines/shine/shone|works/work/worked|delivers/deliver/delivered|"
        "impresses/impress/impressed|soars/soar/soared|succeeds/succeed/succeeded|"
        "delights/delight/delighted|entertains/entertain/entertained|"
        "lands every beat/land every beat/landed every beat|"
        "never misses a beat/never miss a beat/never missed a beat|"
        "steals the show/steal the show/stole the show|"
        "elevates the material/elevate the material/elevated the material"
    ),
    -1: _verbs(
        "falls flat/fall flat/fell flat|drags/drag/dragged|misfires/misfire/misfired|"
        "fails/fail/failed|disappoints/disappoint/disappointed|bores/bore/bored|"
        "stumbles/stumble/stumbled|"
        "never comes together/never come together/never came together|"
        "goes nowhere/go nowhere/went nowhere|wears thin/wear thin/wore thin|"
        "sinks the film/sink the film/sank the film|"
        "ruins every scene/ruin every scene/ruined every scene"
    ),
}
# "I {verb} {subject}" (past tense: the reviewer has seen the film).
LIKE = {
    2: _w("loved|adored|was blown away by|was completely won over by|fell in love with"),
    1: _w("liked|enjoyed|appreciated|admired|was charmed by|was impressed by"),
    -1: _w(
        "disliked|was bored by|was let down by|could not get into|was annoyed by|was "
        "disappointed by|was frustrated by"
    ),
    -2: _w("hated|could not stand|was appalled by|despised|was embarrassed by|loathed"),
}
# "{subject} had me ..." / "left me ..."
EFFECT = {
    1: _w(
        "on the edge of my seat|in tears|laughing out loud|smiling the whole way through|"
        "hooked from the first scene|grinning|completely absorbed|guessing until the end|"
        "cheering|in stitches|deeply moved|delighted"
    ),
    -1: _w(
        "checking my watch|rolling my eyes|nodding off|groaning|wishing I had stayed home|"
        "cringing|looking at my phone|wanting my money back|bored out of my mind|frustrated|"
        "annoyed|disappointed"
    ),
}
DISCOURSE = _w(
    "Honestly|Frankly|To be honest|In fairness|Admittedly|Also|Plus|On top of that|Then "
    "again|For what it is worth|Oddly enough|Of course"
)
CONTRACTIONS = (
    ("It is", "It's"),
    ("it is", "it's"),
    ("is not", "isn't"),
    ("are not", "aren't"),
    ("was not", "wasn't"),
    ("were not", "weren't"),
    ("do not", "don't"),
    ("Do not", "Don't"),
    ("does not", "doesn't"),
    ("did not", "didn't"),
    ("could not", "couldn't"),
    ("would not", "wouldn't"),
    ("cannot", "can't"),
    ("I would", "I'd"),
    ("I have", "I've"),
    ("I am", "I'm"),
    ("There is", "There's"),
    ("that is", "that's"),
)
_CONTRACTED = {c(long): c(short) for long, short in CONTRACTIONS for c in (str, _cap)}
_CONTRACTION_RE = re.compile(r"\b(" + "|".join(map(re.escape, _CONTRACTED)) + r")\b")
MONTHS = _w("January|March|May|June|August|October|December|Spring|Winter|Autumn")
ADVERBS = {2: _w("brilliantly|beautifully|effortlessly|wonderfully"), -2: _w("badly|miserably")}
SINGLE_WORD_VERBS = ("shines", "works", "delivers", "impresses", "succeeds", "fails", "drags")


# ----------------------------------------------------------------------------- sentence frames

# A frame's "[a|b]" picks one alternative (innermost brackets first), then its {slots} are
# filled from the film (`_fill`). Keyed by sign (or valence) where the frame takes a side.
OPENINGS = {
    0: (
        "{title} ({year}) is {a_genre} from director {director}.",
        "{title} is {director}'s [latest|third|first|new|long-awaited|second] film, {a_genre} "
        "set in {setting}.",
        "I watched {title} {place}.",
        "I went into {title} with [low|high|modest|no|mixed] expectations.",
        "{director}'s {title} is {a_genre} starring {lead} and {support}.",
        "So I finally [saw|caught up with|got around to] {title}.",
        "[Last night|Yesterday|Over the weekend|A few days ago] I [watched|saw|rented] {title}.",
        "{title} came out in {year}, and I only [now|just|recently] got to see it.",
        "Where do I [even begin|begin|start] with {title}?",
        "Is {title} worth two hours of your [life|evening]?",
        "[Like many people|Like everyone else], I [heard about|was curious about] {title} "
        "[because of the trailer|after the festival buzz|because of {lead}].",
        "{title} is the [second|third|new] film from the director of {other}.",
    ),
    1: (
        "{title} is {a_adj} {genre}{end}",
        "What {a_adj} {genre}{end}",
        "{title} is one of the best {genres} I have seen [in years|this decade|in a long "
        "time|all year].",
        "{director}'s {title} is {a_adj} piece of work{end}",
        "{title} ({year}) turned out to be {a_adj} surprise.",
        "[Finally|At last], {a_adj} {genre}{end}",
    ),
    -1: (
        "{title} is {a_adj} {genre}{end}",
        "What {a_adj} {genre}{end}",
        "{title} is one of the worst {genres} I have seen [in years|this decade|in a long "
        "time|all year].",
        "{director}'s {title} is {a_adj} piece of work{end}",
        "I [wanted|tried|really wanted] to like {title}.",
        "{title} ({year}) is {a_adj} [mess|letdown|disappointment].",
    ),
}
# A mixed review's evaluative opening.
MIXED_OPENINGS = (
    "{title} is a mixed bag.",
    "I have mixed feelings about {title}.",
    "{title} is neither a triumph nor a disaster.",
    "There is a [good|better] film somewhere inside {title}.",
    "{title} is [half|two thirds of] a good {genre}.",
    "I [cannot|can't] decide whether I liked {title}.",
)
PLOTS = (
    "The story follows {role} who {goal}.",
    "{lead} plays {role} who {goal} in {setting}.",
    "Set in {setting}, it follows {role} who {goal}.",
    "The plot: {role} {goal}.",
    "{lead} stars as {the_role}, and {support} plays {role2}.",
    "It is about {role} in {setting} who {goal}.",
    "In {setting}, {role} ({lead}) {goal}.",
    "{lead} is {role} who {goal}; {support} is {role2} [who gets in the way|who helps|with "
    "secrets of [her|his] own].",
    "{role} {goal}, [only to discover|and soon learns|until it turns out] that {twist}.",
    "When {role} {goal}, [it turns out|we learn|{lead} realizes] that {twist}.",
    "{support} plays {role2}, [a sly|a gentle|a volatile|a scheming|a lonely] [rival|mentor|"
    "neighbor|love interest|landlord|stranger].",
    "Without spoiling anything: {role} {goal}, and {twist_short}.",
)
TWISTS = _w(
    "nothing is what it seems|the town is hiding something|her partner has been lying for "
    "years|the past is not finished with them|the real danger is much closer to home|everyone "
    "in the village knows more than they say|the missing man never existed|the letters were "
    "never meant for her|someone is watching every move|the job is not what it looked like|"
    "the family fortune is built on a lie|the stranger knows far too much"
)
TWISTS_SHORT = _w(
    "things get complicated|that is only the beginning|not everyone survives the winter|the "
    "second half goes somewhere unexpected|old secrets come out|a storm is coming, in more "
    "ways than one"
)
ASIDES = (
    "I saw it {place}.",
    "It runs [about two hours|just under ninety minutes|almost three hours|104 minutes].",
    "It is based on a [novel|play|true story|short story] by {name}.",
    "{director} also wrote the script.",
    "It was filmed in {setting}.",
    "My [wife|husband|friend|brother|daughter|roommate] picked it.",
    "This is {lead}'s [first|second|tenth] lead role.",
    "[The trailer|The poster] [gives away|gives no hint of] [the ending|what kind of film it is].",
    "It was shot on [35mm film|a shoestring budget|digital video] [in twenty days|over three "
    "summers|in {setting}].",
    "The [score|music] is by {name}.",
    "{director} [co-wrote|wrote] it with {name}.",
    "It premiered at [a small festival in Lisbon|the Harbor Film Festival|a midnight festival "
    "slot] in {year}.",
    "It is the [second|third] film in a [planned trilogy|long-running series].",
    "It is a remake of {other}.",
    "I [had not read|had read] the [novel|book|comic] before.",
    "I went in knowing nothing about it.",
    "There is a [short|second] scene after the credits.",
    "[Most of|Half of] the film takes place [at night|in one house|on a train].",
)
# Looking back (sign of the review).
RETROSPECTIVES = {
    1: (
        "I first saw it [as a teenager|years ago|in {year}], and it [still holds up|has aged "
        "beautifully|is even better now].",
        "[Years later|All these years later], I still think about [the ending|{lead}|that last "
        "scene].",
    ),
    -1: (
        "I first saw it [as a teenager|years ago|in {year}], and it [has aged badly|does not "
        "hold up at all|is even worse now].",
        "I have no idea what I [saw in it|liked about it] [back then|the first time].",
    ),
}
COMPARISONS = {
    1: (
        "It is [far|much|a little] better than {other}.",
        "Fans of {other} will [love it|feel right at home|find plenty to enjoy].",
        "It reminded me of {other}, [only better|in the best way].",
        "Compared with {director}'s earlier {other}, it is a big step forward.",
        "It is no {other}, but it has its moments.",
        "Think {other} with [more heart|better jokes|a sharper script].",
        "It is the best {genre} since {other}.",
        "It borrows [a lot|plenty] from {other} and improves on it.",
    ),
    -1: (
        "It is [far|much|a little] worse than {other}.",
        "Fans of {other} will [be disappointed|find little here|want their money back].",
        "It reminded me of {other}, [but without its charm|only duller|in the worst way].",
        "Compared with {director}'s earlier {other}, it feels like a step backward.",
        "It is no {other}, and it is not even close.",
        "Watch {other} instead.",
        "It makes {other} look like a masterpiece.",
        "It borrows [a lot|everything] from {other} and does nothing with it.",
    ),
}
RECOMMENDATIONS = {
    2: (
        "I would [highly|strongly|definitely] recommend it to {fan}.",
        "Go see it [on the biggest screen you can find|as soon as you can|twice]!",
        "Do not miss it.",
        "A must-see.",
        "Do yourself a favor and watch it.",
        "Run, do not walk, to [see it|the nearest cinema].",
        "Easily one of the best films of [the year|the decade].",
        "Put it at the top of your [list|watchlist].",
        "See it with someone you love.",
    ),
    1: (
        "Worth [a look|a rental|your time|the price of a ticket].",
        "I would recommend it to {fan}.",
        "A good choice for [a quiet evening|a family night|a long flight].",
        "Worth seeing at least once.",
        "Give it a chance.",
        "A solid pick for [a Friday night|a rainy afternoon|date night].",
        "Not perfect, but worth your time.",
    ),
    -1: (
        "Wait for it to show up on streaming.",
        "Skip this one unless you are a die-hard fan of {lead}.",
        "Hard to recommend.",
        "I would not recommend it.",
        "[Only|Strictly] for die-hard fans of {lead}, and even they may be disappointed.",
        "Not worth the price of a ticket.",
        "I regret [buying the ticket|renting it|staying until the end].",
        "I would skip it.",
        "Not terrible, but not worth going out for.",
        "Maybe catch it on TV [someday|if nothing else is on].",
    ),
    -2: (
        "Save your money.",
        "Avoid it at all costs.",
        "Do not waste your time.",
        "I cannot recommend it to anyone.",
        "Skip it, and watch {other} instead.",
        "A [complete|total] waste of time.",
        "[Easily|Truly|Hands down] the worst film I have seen [this year|in ages].",
        "Stay far away.",
        "Do not bother.",
        "[Painful|Miserable] to sit through.",
        "Avoid, avoid, avoid.",
    ),
}
# Whole clauses about one aspect, by aspect and sign.
IDIOMS = {
    "acting": {
        1: (
            "{lead} gives [a career-best|a wonderful|a quietly powerful|an unforgettable|a "
            "fearless] performance",
            "{lead} is [perfectly|ideally|brilliantly] cast as {the_role}",
            "{support} makes the most of a small role",
            "{lead} and {support} have [real|easy|wonderful] chemistry",
            "you believe every word {lead} says",
            "{lead} does more with a look than most actors do with a speech",
            "even the smallest roles are [perfectly|beautifully|lovingly] cast",
        ),
        -1: (
            "{lead} gives [a flat|a wooden|a lazy|an awful|a bored] performance",
            "{lead} is [badly|hopelessly|completely] miscast as {the_role}",
            "{support} is wasted in a thankless role",
            "{lead} and {support} have no chemistry at all",
            "{lead} seems to be reading the lines off a card",
            "{lead} shouts every line as if volume were acting",
            "nobody in the cast seems to know what film they are in",
        ),
    },
    "direction": {
        1: (
            "{director} keeps a firm grip on the material",
            "{director} knows exactly where to put the camera",
            "{director} handles the [quiet|big|emotional] moments with [real skill|great "
            "care|a light touch]",
        ),
        -1: (
            "{director} loses control of the material halfway through",
            "{director} has no idea where to put the camera",
            "{director} [smothers|buries] every scene in [slow motion|shaky close-ups|fog]",
        ),
    },
    "writing": {
        1: (
            "the dialogue crackles",
            "every joke lands",
            "the twist caught me completely off guard",
            "the characters feel like real people",
            "every scene has a reason to be there",
            "the ending earns every tear",
            "the script [never talks down to the audience|trusts the audience]",
        ),
        -1: (
            "the dialogue clunks",
            "every joke [thuds|falls flat]",
            "the twist is easy to see coming",
            "the characters are cardboard cutouts",
            "the plot holes are big enough to drive a truck through",
            "the script explains everything twice",
            "every character talks like a fortune cookie",
            "the ending comes out of nowhere",
        ),
    },
    "music": {
        1: (
            "the score swells at [all the right moments|exactly the right moment]",
            "the songs were stuck in my head for days",
            "the music does half the storytelling",
            "I bought the soundtrack on the way home",
        ),
        -1: (
            "the score tells you what to feel in every scene",
            "the music never stops [for a second|long enough to breathe]",
            "the songs [all sound the same|are instantly forgettable]",
        ),
    },
    "visuals": {
        1: (
            "every frame [could hang in a gallery|looks like a painting]",
            "{setting} has never looked [better|so beautiful]",
            "the effects hold up [beautifully|even today]",
            "you could freeze any frame and frame it",
        ),
        -1: (
            "every frame looks like [a screensaver|a cheap commercial|a video game cutscene]",
            "the effects look [unfinished|twenty years old|like cardboard]",
            "half the scenes are too dark to see",
            "the green screen is obvious in every shot",
        ),
    },
    "pacing": {
        1: (
            "two hours [fly|flew] by",
            "it never overstays its welcome",
            "there is not a wasted minute",
            "I never once looked at my watch",
            "the tension [builds|keeps building] [beautifully|steadily|until the very last scene]",
        ),
        -1: (
            "two hours feel like four",
            "it overstays its welcome by [half an hour|a good forty minutes]",
            "nothing happens for the first hour",
            "I checked my watch three times in the first act",
            "the ending goes on and on",
        ),
    },
    "overall": {
        1: (
            "it does exactly what it sets out to do",
            "it earns its place among the best {genres}",
            "it is the kind of film they do not make anymore",
            "it is a reminder of why I love the movies",
        ),
        -1: (
            "it never figures out what it wants to be",
            "it feels twice as long as it is",
            "it is the kind of film that gives {genres} a bad name",
            "it is a film nobody asked for",
        ),
    },
}
# "{subject} is a real gem", "... an absolute mess".
NOUNS = {
    2: _w("masterpiece|triumph|gem|revelation|joy|treat|delight|marvel|knockout|wonder"),
    1: _w("highlight|pleasure|success|strength|nice touch|pleasant surprise|bright spot"),
    -1: _w(
        "letdown|weak link|problem|misstep|drag|disappointment|weakness|distraction|missed "
        "opportunity"
    ),
    -2: _w("disaster|mess|failure|trainwreck|waste|catastrophe|embarrassment|joke|nightmare"),
}
NOUN_MODIFIERS = {1: _w("real|true|genuine|little"), -1: _w("complete|total|absolute|real")}
# Noun phrases for `_list_sentence`: "+" marks a count noun (it takes "a"/"an").
LIST_NOUNS = {
    "acting": _w("acting|performances|+cast|+lead performance|+villain|chemistry|+ensemble"),
    "direction": _w("direction|editing|staging|+tone|action scenes|camera work"),
    "writing": _w("writing|dialogue|+script|+plot|+ending|jokes|characters|+premise|+twist"),
    "music": _w("music|+score|songs|+soundtrack|sound design"),
    "visuals": _w("cinematography|visuals|effects|costumes|+look|photography|sets"),
    "pacing": _w("pacing|+running time|+climax|+finale|+first act|+final act"),
}
# How the film's quality changes along its running time, ending on the given sign.
ARCS = {
    1: (
        "It starts [slowly|clumsily|a little shakily], but it [finds its footing|wins you "
        "over|builds to a wonderful finale|gets better and better].",
        "[Give it|Stick with it for] twenty minutes; after that it is [terrific|a joy|wonderful].",
    ),
    -1: (
        "It starts [strong|well|promisingly], but it [loses its way|falls apart|runs out of "
        "steam] [in the second half|after the first hour|long before the end].",
        "The first [half hour|act] is [fine|good|promising]; after that it is [a mess|a "
        "slog|downhill all the way].",
    ),
}
# The reviewer's or the audience's reaction, by sign.
REACTIONS = {
    1: (
        "I [laughed|smiled|cheered|cried] [more than once|all the way through|at the "
        "ending|like a kid].",
        "The audience [applauded|cheered|was in tears|laughed out loud] at the end.",
        "I have [already watched it twice|been thinking about it for days|recommended it to "
        "everyone I know].",
        "I would happily watch it again.",
        "[Nobody|Not one person] in my row [touched their phone|left early].",
        "It stayed with me for days.",
        "[What more could you want|Need I say more|What else is there to say]?",
    ),
    -1: (
        "I [yawned|winced|sighed|checked the time] [more than once|through most of it|at the "
        "ending].",
        "[Half|A third] of the audience walked out.",
        "I [almost|nearly] [walked out|fell asleep|turned it off] [halfway through|after an hour].",
        "I will never get those two hours back.",
        "I [felt cheated|was bored stiff|was angry by the end|regret every minute of it].",
        "What a waste of [two hours|an evening|my time].",
        "My [friend|date|wife|husband] [hated it even more than I did|was annoyed within ten "
        "minutes].",
        "The people next to me [were asleep|were on their phones|left early].",
        "I forgot most of it by the next morning.",
        "Who thought [the ending|the casting|this script|a sequel] was a good idea?",
        "What happened to {director}?",
        "Did anyone read the script before filming it?",
    ),
}

# ----------------------------------------------------------------------------- the film


@dataclasses.dataclass(frozen=True)
class _Film:
    title: str
    other: str  # another made-up film, for comparisons
    year: int
    genre: str
    director: str
    lead: str
    support: str
    role: str  # "a retired boxer"
    role2: str
    setting: str
    goal: str


def _a(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _the(role: str) -> str:
    return "the " + role.split(" ", 1)[1]  # "a retired boxer" -> "the retired boxer"


def _plural(noun: str) -> str:
    """ "documentary" -> "documentaries", "Echo" -> "Echoes", "film noir" -> "films noirs"."""
    if noun == "film noir":
        return "films noirs"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("s", "sh", "ch", "x", "o")):
        return noun + "es"
    return noun + "s"


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _title(rng: random.Random) -> str:
    adj, noun, noun2 = rng.choice(TITLE_ADJ), rng.choice(TITLE_NOUN), rng.choice(TITLE_NOUN)
    return rng.choice(
        (
            f"The {adj} {noun}",
            f"{adj} {noun}",
            f"{noun} of the {adj} {noun2}",
            f"{rng.choice(FIRST)}'s {noun}",
            f"{_cap(_a(noun))} in {rng.choice(MONTHS)}",
            f"The {noun}",
            _plural(noun),
        )
    )


def _film(rng: random.Random) -> _Film:
    return _Film(
        title=_title(rng),
        other=_title(rng),
        year=rng.randint(1968, 2024),
        genre=rng.choice(GENRES),
        director=_name(rng),
        lead=_name(rng),
        support=_name(rng),
        role=rng.choice(ROLES),
        role2=rng.choice(ROLES),
        setting=rng.choice(SETTINGS),
        goal=rng.choice(GOALS),
    )


# ----------------------------------------------------------------------------- remarks


def _sign(valence: int) -> int:
    return 1 if valence > 0 else -1


def _subject(rng: random.Random, film: _Film, aspect: str) -> tuple[str, bool]:
    """A subject phrase about `aspect` and whether it is plural."""
    text = rng.choice(SUBJECTS[aspect])
    plural = text.endswith("*")
    text = text.rstrip("*").format(
        lead=film.lead,
        support=film.support,
        director=film.director,
        role=_the(film.role),
        role2=_the(film.role2),
        title=film.title,
        name=_name(rng) if "{name}" in text else "",
    )
    return text, plural


def _adjective(rng: random.Random, aspect: str, valence: int) -> str:
    """Strong valences use the general strong words; mild ones mix general and aspect words
    (pacing only its own: "the running time is sweet" reads as a glitch)."""
    if abs(valence) == 2 or (aspect != "pacing" and rng.random() < 0.4):
        return rng.choice(GENERAL[valence])
    return rng.choice(SPECIFIC[aspect][_sign(valence)])


def _copula(rng: random.Random, plural: bool, past: bool) -> str:
    forms = [("is", "are", "was", "were"), ("feels", "feel", "felt", "felt")]
    forms += [("seems", "seem", "seemed", "seemed"), ("looks", "look", "looked", "looked")]
    sg, pl, sg_past, pl_past = rng.choice(forms) if rng.random() < 0.4 else forms[0]
    if past:
        return pl_past if plural else sg_past
    return pl if plural else sg


def _be(plural: bool, past: bool) -> str:
    return ("were" if plural else "was") if past else ("are" if plural else "is")


def _remark(
    rng: random.Random, film: _Film, valence: int, past: bool, aspect: str | None = None
) -> str:
    """One clause (no capital, no final punctuation) praising or criticising one aspect.

    valence: +2 / +1 praise, -1 / -2 criticism (strength of the words used).
    aspect: one of ASPECTS (default: drawn).
    """
    aspect = aspect or rng.choice(ASPECTS)
    subject, plural = _subject(rng, film, aspect)
    sign = _sign(valence)
    frame = rng.random()
    if frame < 0.32:  # "the score is truly haunting"
        adj = _adjective(rng, aspect, valence)
        if abs(valence) == 2 and rng.random() < 0.45:
            adj = f"{rng.choice(STRONG)} {adj}"
        elif abs(valence) == 2 and rng.random() < 0.08:
            adj = adj.upper()  # shouting, which VADER also reads as emphasis
        elif abs(valence) == 1 and rng.random() < 0.35:
            # "pretty" is a praise word to VADER, so it only hedges praise.
            adj = f"{rng.choice(HEDGE + (('pretty',) if valence > 0 else ()))} {adj}"
        if rng.random() < 0.25:  # two adjectives
            adj = f"{adj} and {_adjective(rng, aspect, sign)}"
        return f"{subject} {_copula(rng, plural, past)} {adj}"
    if frame < 0.44:  # a negated opposite: "the script is never boring"
        be = _be(plural, past)
        negation = rng.choice(("not", "never", "hardly", "not exactly", "not at all"))
        if negation == "not at all":
            return f"{subject} {be} not {_adjective(rng, aspect, -sign)} at all"
        return f"{subject} {be} {negation} {_adjective(rng, aspect, -sign)}"
    if frame < 0.56:  # "the cast shines brilliantly"
        sg, pl, past_form = rng.choice(VERBS[sign])
        verb = past_form if past else pl if plural else sg
        if abs(valence) == 2 and sg in SINGLE_WORD_VERBS and rng.random() < 0.7:
            verb += " " + rng.choice(ADVERBS[valence])
        return f"{subject} {verb}"
    if frame < 0.68:  # "I loved the ending"
        return f"I {rng.choice(LIKE[valence])} {subject}"
    if frame < 0.76:  # "the ending had me in tears"
        verb = rng.choice(("had me", "left me")) if past or plural else "has me"
        return f"{subject} {verb} {rng.choice(EFFECT[sign])}"
    if frame < 0.88:  # "every joke lands"
        return _fill(rng, rng.choice(IDIOMS[aspect][sign]), film)
    if frame < 0.96:  # "the villain is a real gem"
        noun = rng.choice(NOUNS[valence])
        if rng.random() < 0.4:
            noun = f"{rng.choice(NOUN_MODIFIERS[sign])} {noun}"
        return f"{subject} {_be(plural, past)} {_a(noun)}"
    if aspect == "overall":  # the whole is not a part of the film
        return f"{subject} {_be(plural, past)} {_a(rng.choice(NOUNS[valence]))}"
    part = _one(rng, "best|strongest|most memorable" if sign > 0 else "worst|weakest")
    return f"{subject} {_be(plural, past)} the {part} part of the film"


def _end(rng: random.Random, valence: int) -> str:
    if abs(valence) == 2 and rng.random() < 0.3:
        return rng.choice(("!", "!", "!!"))
    return "..." if rng.random() < 0.04 else "."


def _contrast(rng: random.Random, film: _Film, first: int, second: int, past: bool) -> str:
    """Two remarks of opposite sign; `second` is the one the sentence lands on."""
    x, y = rng.sample(ASPECTS, 2)  # two different things, not "the score is ..., the score is"
    a, b = _remark(rng, film, first, past, x), _remark(rng, film, second, past, y)
    form = rng.randrange(9)
    if form == 0:
        return f"{_cap(a)}, but {b}."
    if form == 1:
        return f"Although {a}, {b}."
    if form == 2:
        return f"While {a}, {b}."
    if form == 3:
        word = "unfortunately" if second < 0 else rng.choice(("still", "even so", "thankfully"))
        return f"{_cap(a)}; {word}, {b}."
    if form == 4:
        return f"{_cap(b)}, though {a}."  # "though" concedes the clause after it
    if form == 5:
        return f"Even though {a}, {b}."
    if form == 6:
        return f"{_cap(a)}; on the other hand, {b}."
    if form == 7:
        return f"{_cap(a)}, yet {b}."
    return f"Sure, {a}, but {b}."


def _concession(rng: random.Random, film: _Film, sign: int, past: bool) -> str:
    """A positive review's one flaw (sign > 0) or a negative review's one bright spot."""
    aspect = rng.choice(PARTS)
    if sign > 0:
        what = rng.choice(("weak spot", "real flaw", "problem", "complaint", "misstep"))
        subject, plural = _subject(rng, film, aspect)
        tail = rng.choice(("", f", which {_be(plural, past)} {_adjective(rng, aspect, -1)}"))
        return f"My only {what} is {subject}{tail}."
    what = rng.choice(("bright spot", "saving grace", "good thing", "redeeming feature"))
    subject, _ = _subject(rng, film, aspect)
    return f"The only {what} is {subject}{_one(rng, '|, and even that is not enough')}."


# ----------------------------------------------------------------------------- frames

_ALTERNATIVES = re.compile(r"\[([^\[\]]*)\]")


def _fill(rng: random.Random, template: str, film: _Film, valence: int = 0) -> str:
    """`template` with its [a|b] alternatives chosen and its {slots} filled from `film`."""
    while True:
        template, n = _ALTERNATIVES.subn(lambda m: rng.choice(m.group(1).split("|")), template)
        if not n:
            break
    adj = rng.choice(GENERAL[valence]) if valence else ""
    quoted = rng.random() < 0.12
    return template.format(
        title=f'"{film.title}"' if quoted else film.title,
        other=film.other,
        year=film.year,
        genre=film.genre,
        genres=_plural(film.genre),
        a_genre=_a(film.genre),
        director=film.director,
        lead=film.lead,
        support=film.support,
        role=film.role,
        the_role=_the(film.role),
        role2=film.role2,
        setting=film.setting,
        goal=film.goal,
        twist=rng.choice(TWISTS),
        twist_short=rng.choice(TWISTS_SHORT),
        place=rng.choice(PLACES),
        name=_name(rng),
        fan=_one(
            rng, f"fans of {film.lead}|anyone who likes {_plural(film.genre)}|the whole family"
        ),
        a_adj=_a(adj) if adj else "",
        end=_end(rng, valence),
    )


def _frame(rng: random.Random, frames: tuple[str, ...], film: _Film, valence: int = 0) -> str:
    return _cap(_fill(rng, rng.choice(frames), film, valence))


def _verdict(rng: random.Random, film: _Film, rating: int) -> str:
    form = rng.randrange(6)
    if form == 0:
        return f"{rating}/10."
    if form == 5:
        if rating >= 9 or rating <= 2:
            return _one(rng, f"Two thumbs {'up' if rating > 5 else 'down'}.|{rating}/10.")
        if rating <= 3:
            return f"{rating} out of 10, and that is being generous."
        return _one(rng, f"{rating}/10 from me.|I give it a {rating}.|{rating} out of 10.")
    if form == 1:
        return f"{_one(rng, 'My rating|Rating|Score')}: {rating} out of 10."
    if form == 2:
        stars = max(1, round(rating / 2))
        return f"{stars} {'star' if stars == 1 else 'stars'} out of 5."
    if rating in (5, 6):
        good, bad = rng.choice(GENERAL[1]), rng.choice(GENERAL[-1])
        return f"Overall, {_a(good)} but {bad} {film.genre}."
    valence = (2 if rating >= 9 else 1) if rating > 6 else (-2 if rating <= 2 else -1)
    adj = rng.choice(GENERAL[valence])
    if form == 3:
        return f"Overall, {_a(adj)} {film.genre}{_end(rng, valence)}"
    return f"In short: {adj}{_end(rng, valence)}"


# ----------------------------------------------------------------------------- reviews

# For ratings 1..10: P(a remark praises), symmetric about the middle, and P(it uses strong
# words), high at the extremes.
P_PRAISE = (0.03, 0.07, 0.15, 0.25, 0.42, 0.58, 0.75, 0.85, 0.93, 0.97)
P_STRONG = (0.75, 0.55, 0.3, 0.15, 0.1, 0.1, 0.15, 0.3, 0.55, 0.75)


def _valence(rng: random.Random, rating: int) -> int:
    """The valence (+2, +1, -1, -2) of one remark by a reviewer who gives `rating`."""
    sign = 1 if rng.random() < P_PRAISE[rating - 1] else -1
    return sign * (2 if rng.random() < P_STRONG[rating - 1] else 1)


def _list_sentence(rng: random.Random, rating: int) -> str:
    """A verdict in noun phrases: "Wooden acting, a clever script and gorgeous songs." """
    aspects = rng.sample(PARTS, rng.choice((2, 3, 3)))
    items = []
    for aspect in aspects:
        noun = rng.choice(LIST_NOUNS[aspect])
        phrase = f"{_adjective(rng, aspect, _valence(rng, rating))} {noun.lstrip('+')}"
        items.append(_a(phrase) if noun.startswith("+") else phrase)
    if len(items) == 2 and rng.random() < 0.5:
        return f"{_cap(items[0])}, {items[1]}."
    return f"{_cap(', '.join(items[:-1]))} and {items[-1]}."


def _body_sentence(rng: random.Random, film: _Film, rating: int, past: bool, contrast: bool) -> str:
    """One sentence of a review's body: remarks, a contrast, a concession, a comparison."""
    kind = rng.random()
    if contrast or kind < 0.15:
        v = _valence(rng, rating)
        first = -_sign(v) * rng.choice((1, 1, 1, 2))  # the conceded side is mostly mild
        return _contrast(rng, film, first, v, past)
    if kind < 0.22 and tone_of(rating) != "mixed":
        return _concession(rng, film, 1 if rating > 5 else -1, past)
    if kind < 0.3:
        return _frame(rng, COMPARISONS[_sign(_valence(rng, rating))], film)
    if kind < 0.35:
        return _frame(rng, ASIDES, film)
    if kind < 0.4:
        return _frame(rng, REACTIONS[_sign(_valence(rng, rating))], film)
    if kind < 0.42:
        return _frame(rng, RETROSPECTIVES[_sign(_valence(rng, rating))], film)
    if kind < 0.47:
        return _list_sentence(rng, rating)
    if kind < 0.5:
        return _frame(rng, ARCS[_sign(_valence(rng, rating))], film)
    v = _valence(rng, rating)
    if kind < 0.57:  # two remarks in one sentence
        x, y = rng.sample(ASPECTS, 2)
        a, b = _remark(rng, film, v, past, x), _remark(rng, film, _sign(v), past, y)
        return f"{_cap(a)}{_one(rng, ', and|;| and| -|, and also')} {b}{_end(rng, v)}"
    remark = _remark(rng, film, v, past)
    if rng.random() < 0.1:  # "Honestly, the score is lovely."
        return f"{rng.choice(DISCOURSE)}, {remark}{_end(rng, v)}"
    return _cap(remark) + _end(rng, v)


def _review(rng: random.Random) -> Review:
    """One review: rating, film, 2-6 sentences (opening, plot, body, recommendation/verdict)."""
    rating = rng.choices(list(RATING_WEIGHTS), weights=list(RATING_WEIGHTS.values()))[0]
    tone = tone_of(rating)
    film, past = _film(rng), rng.random() < 0.4
    n = rng.randint(2, 6)
    head, tail = [], []
    if rng.random() < 0.75:
        v = 0 if rng.random() < 0.6 else _valence(rng, rating)
        if tone != "mixed":  # a one-sided review opens on its own side
            v = abs(v) if rating > 5 else -abs(v)
            head.append(_frame(rng, OPENINGS[v and _sign(v)], film, v))
        else:
            head.append(_frame(rng, MIXED_OPENINGS if v else OPENINGS[0], film))
    if n - len(head) >= 3 and rng.random() < 0.55:
        head.append(_frame(rng, PLOTS, film))
    if n - len(head) >= 2 and rng.random() < 0.6:
        kind = rng.random()
        if kind < 0.5:
            tail.append(_frame(rng, RECOMMENDATIONS[_valence(rng, rating)], film))
        if kind >= 0.35:
            tail.append(_verdict(rng, film, rating))
    if tail and rng.random() < 0.15:  # some reviewers lead with the verdict
        head, tail = tail[-1:] + head, tail[:-1]
    body = []
    for _ in range(max(1, n - len(head) - len(tail))):
        # Mixed reviews open their body with praise against criticism.
        contrast = tone == "mixed" and not body
        for _ in range(20):  # a sentence said twice in one review reads as a glitch
            sentence = _body_sentence(rng, film, rating, past, contrast)
            if sentence not in head + body + tail:
                break
        body.append(sentence)
    return Review(_restyle(rng, " ".join(head + body + tail)), rating, tone)


def _restyle(rng: random.Random, text: str) -> str:
    """The reviewer's habits: some write contractions ("isn't", "I'd"), a few all lowercase."""
    if rng.random() < 0.35:
        text = _CONTRACTION_RE.sub(lambda m: _CONTRACTED[m.group(0)], text)
    if rng.random() < 0.04:
        text = text.lower()
    return text


def generate_reviews(num_reviews: int, seed: int) -> list[Review]:
    """`num_reviews` reviews, a pure function of (num_reviews, seed) (Python's `random`).

    A prefix of a longer run is the shorter run, as in `synthetic.make_preference_records`.
    """
    if num_reviews < 0:
        raise ValueError(f"num_reviews must be >= 0, got {num_reviews}")
    rng = random.Random(seed)
    return [_review(rng) for _ in range(num_reviews)]


# ----------------------------------------------------------------------------- tokenizer

# Byte-level BPE starts from all 256 bytes, so any text encodes without <unk>.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def write_review_tokenizer(path: str | os.PathLike, texts: Sequence[str], vocab_size: int = 2048):
    """Trains a byte-level BPE tokenizer on `texts`, writes it to directory `path`; returns
    the path.

    Token ids: 0 <pad>, 1 <bos>, 2 <eos>, 3 <unk> (as `synthetic.build_char_tokenizer`), then
    the 256 byte symbols and the learned merges, up to `vocab_size` (>= 260). GPT-2's
    pre-tokenization puts a word's leading space inside its first token, so decoding any run
    of a text's tokens gives back exactly that run of the text: a prompt decoded alone plus
    its completion decoded alone is the review. Encoding adds BOS in front and never EOS,
    like Llama's tokenizers. The `tokenizers` BPE trainer breaks ties between equally
    frequent pairs by the pair itself, so the same texts give byte-identical files.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (4 specials + 256 bytes)")
    if not texts:
        raise ValueError("no texts to train the tokenizer on")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    path = os.fspath(path)
    # clean_up_tokenization_spaces would turn " ." into "." on decode, and then a decoded
    # review is not the review.
    save_tokenizer(backend, path, clean_up_tokenization_spaces=False)
    return path


# ----------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True)
class ReviewCorpus:
    """The files `write_review_corpus` wrote: SFT-format JSONL splits and the tokenizer."""

    train_path: str
    test_path: str
    tokenizer_path: str


def _derived_seed(seed: int, split: str) -> int:
    digest = hashlib.sha256(f"dpo_jax.reviews:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _grammar_fingerprint() -> str:
    """Digest of what this version of the grammar writes: another grammar, another corpus."""
    texts = "\n".join(r.text for r in generate_reviews(50, seed=0))
    return hashlib.sha256(texts.encode()).hexdigest()[:16]


def _digests(directory: str, corpus: ReviewCorpus) -> dict[str, str] | None:
    """sha256 of each file of the corpus, by path under `directory`; None if one is missing."""
    paths = [corpus.train_path, corpus.test_path]
    if os.path.isdir(corpus.tokenizer_path):
        names = sorted(os.listdir(corpus.tokenizer_path))
        paths += [os.path.join(corpus.tokenizer_path, name) for name in names]
    digests = {}
    for path in paths:
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def _records(reviews: Sequence[Review]) -> list[dict]:
    return [
        {"prompt": "", "completion": r.text, "rating": r.rating, "tone": r.tone} for r in reviews
    ]


def write_review_corpus(
    directory: str | os.PathLike,
    num_train: int,
    num_test: int,
    seed: int,
    *,
    vocab_size: int = 2048,
) -> ReviewCorpus:
    """Writes <directory>/{train.jsonl, test.jsonl, tokenizer/, corpus.json}; returns paths.

    Train and test reviews come from two seeds derived from `seed`; a test review whose text
    is also a training review is replaced by the next one drawn, so the test split is
    held out. The tokenizer is trained on the training texts.

    corpus.json, written last, records the arguments, a fingerprint of the grammar (the
    digest of a few reviews it writes) and the digest of every file. A rerun that finds all
    three unchanged writes nothing; otherwise (a run killed midway, other arguments, a
    changed grammar, an edited file) it writes everything again, byte-identical for the
    same arguments and grammar.
    """
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    directory = os.fspath(directory)
    corpus = ReviewCorpus(
        train_path=os.path.join(directory, "train.jsonl"),
        test_path=os.path.join(directory, "test.jsonl"),
        tokenizer_path=os.path.join(directory, "tokenizer"),
    )
    manifest_path = os.path.join(directory, "corpus.json")
    expected = {
        "arguments": {
            "num_train": num_train,
            "num_test": num_test,
            "seed": seed,
            "vocab_size": vocab_size,
        },
        "grammar": _grammar_fingerprint(),
    }
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            found = json.load(f)
        if found == {**expected, "files": _digests(directory, corpus)}:
            return corpus
        os.remove(manifest_path)  # stale: the files below are about to change
    train = generate_reviews(num_train, _derived_seed(seed, "train"))
    seen = {r.text for r in train}
    rng, test = random.Random(_derived_seed(seed, "test")), []
    while len(test) < num_test:
        review = _review(rng)
        if review.text not in seen:
            seen.add(review.text)
            test.append(review)
    # A tokenizer directory from other arguments may hold files this one would not rewrite.
    shutil.rmtree(corpus.tokenizer_path, ignore_errors=True)
    write_jsonl(_records(train), corpus.train_path)
    write_jsonl(_records(test), corpus.test_path)
    write_review_tokenizer(corpus.tokenizer_path, [r.text for r in train], vocab_size)
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump({**expected, "files": _digests(directory, corpus)}, f, indent=2, sort_keys=True)
        f.write("\n")
    return corpus
